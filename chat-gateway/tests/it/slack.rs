//! The Slack adapter against a local Slack that speaks the documented wire
//! formats (`slack_fake.rs`): Socket Mode (acks, retries, reconnects), the
//! Events API over HTTP (v0 signatures, stale timestamps, retries, slash
//! commands, button clicks), the Web API (posts, edits, uploads, 429s,
//! errors), end to end through the router, and the Block Kit rendering.

#[path = "slack_fake.rs"]
pub(crate) mod fake;

use fleetcmd_gateway::adapters::HttpInbound;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fleetcmd_gateway::adapters::slack::{SlackAdapter, blocks};
use fleetcmd_gateway::adapters::{
    Action, ChatAdapter, CodeBlock, Incoming, MessageRef, Reply, Section,
};
use fleetcmd_gateway::render;
use fleetcmd_gateway::router::Router;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::support::{FakeController, POLICY_BODY, failed_job, router_for, serve_http};
use fake::{BOT_TOKEN, BOT_USER, Fake, TEAM, eventually};

const SECRET: &str = "test-signing-secret";

fn unwrap<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

async fn recv(a: &mut SlackAdapter) -> Incoming {
    match tokio::time::timeout(Duration::from_secs(5), a.recv()).await {
        Ok(Some(m)) => m,
        Ok(None) => panic!("adapter input ended"),
        Err(_) => panic!("no message within 5 s"),
    }
}

fn incoming(who: &str, channel: &str, text: &str, direct: bool, from_bot: bool) -> Incoming {
    Incoming {
        identity: unwrap(fleetcmd_core::ids::Identity::parse(who)),
        channel: channel.to_string(),
        text: text.to_string(),
        thread: None,
        direct,
        from_bot,
    }
}

pub(crate) fn message(user: &str, channel: &str, text: &str, ts: &str) -> Value {
    json!({
        "type": "message", "user": user, "text": text, "ts": ts,
        "channel": channel, "channel_type": "channel", "team": TEAM,
        "client_msg_id": "8d9b7a4e-0000-4000-8000-000000000000",
    })
}

pub(crate) fn callback(event_id: &str, event: Value) -> Value {
    json!({
        "token": "XXYYZZ", "team_id": TEAM, "api_app_id": "A0APP",
        "event": event, "type": "event_callback", "event_id": event_id,
        "event_time": 1_700_000_000, "authorizations": [{ "team_id": TEAM, "user_id": BOT_USER, "is_bot": true }],
    })
}

fn events_api(envelope: &str, event_id: &str, event: Value) -> String {
    json!({
        "envelope_id": envelope, "type": "events_api", "accepts_response_payload": false,
        "retry_attempt": 0, "retry_reason": "", "payload": callback(event_id, event),
    })
    .to_string()
}

fn slash_fields(
    user: &str,
    user_name: &str,
    text: &str,
    trigger: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("token", "gIkuvaNzQIHg97ATvDxqgjtO".into()),
        ("team_id", TEAM.into()),
        ("team_domain", "acme".into()),
        ("channel_id", "C0OPS".into()),
        ("channel_name", "ops".into()),
        ("user_id", user.into()),
        ("user_name", user_name.into()),
        ("command", "/fleetcmd".into()),
        ("text", text.into()),
        ("api_app_id", "A0APP".into()),
        (
            "response_url",
            "https://hooks.slack.com/commands/T0TEAM/1/abc".into(),
        ),
        ("trigger_id", trigger.into()),
    ]
}

fn block_actions(user: &str, action_id: &str, value: &str, trigger: &str) -> Value {
    json!({
        "type": "block_actions",
        "user": { "id": user, "username": "admin", "name": "admin", "team_id": TEAM },
        "api_app_id": "A0APP", "token": "x", "trigger_id": trigger,
        "container": { "type": "message", "message_ts": "1700000000.000001", "channel_id": "C0OPS", "is_ephemeral": false },
        "team": { "id": TEAM, "domain": "acme" },
        "channel": { "id": "C0OPS", "name": "ops" },
        "message": { "type": "message", "ts": "1700000000.000001", "text": "approval needed" },
        "response_url": "https://hooks.slack.com/actions/T0TEAM/1/abc",
        "actions": [{
            "action_id": action_id, "block_id": "fleetcmd_actions",
            "text": { "type": "plain_text", "text": "Approve" },
            "value": value, "style": "primary", "type": "button", "action_ts": "1700000001.000002",
        }],
    })
}

fn interactive(envelope: &str, payload: Value) -> String {
    json!({ "envelope_id": envelope, "type": "interactive", "accepts_response_payload": false, "payload": payload })
        .to_string()
}

fn form(fields: &[(&str, String)]) -> String {
    let enc = |s: &str| {
        let mut out = String::new();
        for b in s.bytes() {
            match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    out.push(b as char)
                }
                b' ' => out.push('+'),
                _ => out.push_str(&format!("%{b:02X}")),
            }
        }
        out
    };
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

// ---------------------------------------------------------------- Socket Mode

#[tokio::test]
async fn socket_mode_acks_every_envelope_and_delivers_what_is_for_us() {
    let fake = Fake::start().await;
    let mut a = unwrap(SlackAdapter::connect(&fake.socket_config()).await);
    assert_eq!((a.team_id(), a.bot_user_id()), (TEAM, BOT_USER));
    eventually("the first connection", || fake.connections() == 1).await;
    assert_eq!(fake.opens(), 1);
    let open = &fake.calls("apps.connections.open")[0];
    assert_eq!(open.auth.as_deref(), Some("Bearer xapp-test-app-token"));
    let auth = &fake.calls("auth.test")[0];
    assert_eq!(auth.auth.as_deref(), Some(&*format!("Bearer {BOT_TOKEN}")));

    let mut alice_dm = message("U0ALICE", "D0DM", "status &amp; health", "1.3");
    alice_dm["channel_type"] = json!("im");
    let mut edited = message("U0ALICE", "C0OPS", "!run reboot on all", "1.4");
    edited["subtype"] = json!("message_changed");
    let mut other_bot = message("U0OTHER", "C0OPS", "!run reboot on all", "1.5");
    other_bot["bot_id"] = json!("B0OTHER");
    let mut evil = callback(
        "Ev9",
        message("U0EVE", "C0OPS", "!run reboot on all", "1.9"),
    );
    evil["team_id"] = json!("T0EVIL");
    let frames = [
        ("E1", events_api("E1", "Ev1", message("U0ALICE", "C0OPS", "!run uptime on all", "1.1"))),
        // Slack's retry of Ev1 in a new envelope: acked, not delivered again.
        ("E2", events_api("E2", "Ev1", message("U0ALICE", "C0OPS", "!run uptime on all", "1.1"))),
        ("E3", events_api("E3", "Ev2", json!({
            "type": "app_mention", "user": "U0ALICE", "text": "<@U0BOT> whoami", "ts": "1.2",
            "channel": "C0OPS", "team": TEAM,
        }))),
        // The same mention as a message event: one delivery per message.
        ("E4", events_api("E4", "Ev3", message("U0ALICE", "C0OPS", "<@U0BOT> whoami", "1.2"))),
        ("E5", events_api("E5", "Ev4", alice_dm)),
        ("E6", events_api("E6", "Ev5", edited)),
        ("E7", events_api("E7", "Ev6", other_bot)),
        ("E8", events_api("E8", "Ev7", message(BOT_USER, "C0OPS", "!help", "1.6"))),
        ("E9", json!({
            "envelope_id": "E9", "type": "slash_commands", "accepts_response_payload": true,
            "payload": Value::Object(slash_fields("U0ALICE", "alice", "run uptime on all", "trig-1")
                .into_iter().map(|(k, v)| (k.to_string(), Value::String(v))).collect()),
        }).to_string()),
        ("E10", interactive("E10", block_actions("U0BOB", "fleetcmd_action_0", "approve 01890a5d-ac96", "trig-2"))),
        ("E11", interactive("E11", block_actions("U0BOB", "fleetcmd_action_1", "run reboot on all", "trig-3"))),
        ("E12", interactive("E12", block_actions("U0BOB", "someone_elses_button", "approve 1", "trig-4"))),
        ("E13", json!({ "envelope_id": "E13", "type": "events_api", "payload": evil }).to_string()),
        ("E14", events_api("E14", "Ev99", message("U0ALICE", "C0OPS", "!sentinel", "1.99"))),
    ];
    let sent_at = Instant::now();
    for (_, frame) in &frames {
        fake.push(frame.clone());
    }
    fake.push("this is not json");
    // Every envelope is acked without anyone reading from the adapter:
    // acks never wait for routing.
    eventually("every envelope acked", || fake.acks().len() == frames.len()).await;
    assert!(
        sent_at.elapsed() < Duration::from_secs(2),
        "acks took {:?}",
        sent_at.elapsed()
    );
    let acks = fake.acks();
    let ids: Vec<&str> = acks
        .iter()
        .filter_map(|(_, a)| a["envelope_id"].as_str())
        .collect();
    let expected: Vec<&str> = frames.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, expected);
    for (_, ack) in &acks {
        if ack["envelope_id"] == "E9" {
            assert_eq!(ack["payload"]["response_type"], "ephemeral");
            assert_eq!(
                ack["payload"]["text"],
                "received `/fleetcmd run uptime on all`"
            );
        } else {
            assert_eq!(ack.as_object().map(|o| o.len()), Some(1), "{ack}");
        }
    }

    let ops = "slack:T0TEAM:C0OPS";
    let mut got = Vec::new();
    for _ in 0..8 {
        got.push(recv(&mut a).await);
    }
    let expected = vec![
        incoming(
            "slack:T0TEAM:U0ALICE",
            ops,
            "!run uptime on all",
            false,
            false,
        ),
        incoming("slack:T0TEAM:U0ALICE", ops, "whoami", true, false),
        incoming(
            "slack:T0TEAM:U0ALICE",
            "slack:T0TEAM:D0DM",
            "status & health",
            true,
            false,
        ),
        incoming(
            "slack:T0TEAM:U0OTHER",
            ops,
            "!run reboot on all",
            false,
            true,
        ),
        incoming("slack:T0TEAM:U0BOT", ops, "!help", false, true),
        incoming(
            "slack:T0TEAM:U0ALICE",
            ops,
            "run uptime on all",
            true,
            false,
        ),
        incoming(
            "slack:T0TEAM:U0BOB",
            ops,
            "approve 01890a5d-ac96",
            true,
            false,
        ),
        incoming("slack:T0TEAM:U0ALICE", ops, "!sentinel", false, false),
    ];
    assert_eq!(got, expected);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), a.recv())
            .await
            .is_err(),
        "nothing else is delivered"
    );
}

#[tokio::test]
async fn socket_mode_reconnects_on_disconnect_and_when_the_socket_drops() {
    let fake = Fake::start().await;
    let mut a = unwrap(SlackAdapter::connect(&fake.socket_config()).await);
    eventually("the first connection", || fake.connections() == 1).await;

    fake.push(json!({ "type": "disconnect", "reason": "refresh_requested", "debug_info": { "host": "fake" } }).to_string());
    eventually("a new apps.connections.open and connection", || {
        fake.opens() == 2 && fake.connections() == 2
    })
    .await;
    fake.push(events_api(
        "E1",
        "Ev1",
        message("U0ALICE", "C0OPS", "!after refresh", "2.1"),
    ));
    assert_eq!(recv(&mut a).await.text, "!after refresh");
    eventually("the ack on the new connection", || {
        fake.acks()
            .iter()
            .any(|(conn, ack)| *conn == 2 && ack["envelope_id"] == "E1")
    })
    .await;

    // A drop without a disconnect message: reconnect after a short backoff.
    let dropped_at = Instant::now();
    fake.drop_socket();
    eventually("a reconnect after the drop", || {
        fake.opens() == 3 && fake.connections() == 3
    })
    .await;
    assert!(
        dropped_at.elapsed() >= Duration::from_millis(700),
        "backoff before reconnecting"
    );
    fake.push(events_api(
        "E2",
        "Ev2",
        message("U0ALICE", "C0OPS", "!after drop", "2.2"),
    ));
    assert_eq!(recv(&mut a).await.text, "!after drop");

    // `shutdown` ends the input.
    a.shutdown_handle().shutdown();
    assert!(a.recv().await.is_none());
}

#[tokio::test]
async fn a_bad_app_token_fails_at_connect_and_names_the_call() {
    let fake = Fake::start().await;
    let mut cfg = fake.socket_config();
    cfg.app_token = Some(fleetcmd_gateway::adapters::slack::ConfigSecret::new(
        "xapp-wrong",
    ));
    let err = unwrap(
        SlackAdapter::connect(&cfg)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
            .err()
            .ok_or("connected"),
    );
    assert_eq!(err, "slack apps.connections.open: invalid_auth");
}

// ------------------------------------------------------------------ Web API

fn sample_reply() -> Reply {
    Reply {
        header: "job 0189 `uptime` on all by slack:T0TEAM:U0ALICE: 2 targets".into(),
        ..Reply::default()
    }
}

async fn events_adapter(fake: &Fake) -> SlackAdapter {
    unwrap(SlackAdapter::connect(&fake.events_config(SECRET)).await)
}

#[tokio::test]
async fn posts_and_edits_with_the_bot_token_spaced_per_channel() {
    let fake = Fake::start().await;
    let a = events_adapter(&fake).await;
    assert_eq!(fake.opens(), 0, "events mode opens no socket");
    let s = a.sender();
    let posted = unwrap(s.send("slack:T0TEAM:C0OPS", sample_reply()).await);
    assert_eq!(
        posted,
        MessageRef {
            channel: "slack:T0TEAM:C0OPS".into(),
            id: "1700000000.000001".into()
        }
    );
    let mut done = sample_reply();
    done.header = "job 0189 succeeded (2/2 ok) — asked by slack:T0TEAM:U0ALICE".into();
    done.thread = Some("1699999999.000009".into());
    unwrap(s.edit(&posted, done).await);

    let post = &fake.calls("chat.postMessage")[0];
    assert_eq!(post.auth.as_deref(), Some(&*format!("Bearer {BOT_TOKEN}")));
    assert!(
        post.content_type.starts_with("application/json"),
        "{}",
        post.content_type
    );
    assert_eq!(post.body["channel"], "C0OPS");
    assert_eq!(
        post.body["text"],
        "job 0189 `uptime` on all by slack:T0TEAM:U0ALICE: 2 targets"
    );
    assert_eq!(
        (
            &post.body["parse"],
            &post.body["link_names"],
            &post.body["unfurl_links"],
            &post.body["unfurl_media"]
        ),
        (&json!("none"), &json!(false), &json!(false), &json!(false))
    );
    assert_eq!(
        post.body["blocks"][0]["text"]["text"],
        "*job 0189 `uptime` on all by slack:T0TEAM:U0ALICE: 2 targets*"
    );
    assert!(post.body.get("thread_ts").is_none());
    let update = &fake.calls("chat.update")[0];
    assert_eq!(
        update.auth.as_deref(),
        Some(&*format!("Bearer {BOT_TOKEN}"))
    );
    assert_eq!(
        (&update.body["channel"], &update.body["ts"]),
        (&json!("C0OPS"), &json!("1700000000.000001"))
    );
    assert_eq!(
        update.body["text"],
        "job 0189 succeeded (2/2 ok) — asked by slack:T0TEAM:U0ALICE"
    );
    let gap = update.at - post.at;
    assert!(
        gap >= Duration::from_millis(950),
        "edits in one channel are spaced ~1 s: {gap:?}"
    );

    // Another channel is not held back by the first one's spacing.
    let mut threaded = sample_reply();
    threaded.thread = Some("1699999999.000009".into());
    let before = Instant::now();
    unwrap(s.send("C0OTHER", threaded).await);
    assert!(
        before.elapsed() < Duration::from_millis(500),
        "{:?}",
        before.elapsed()
    );
    assert_eq!(
        fake.calls("chat.postMessage")[1].body["thread_ts"],
        "1699999999.000009"
    );
}

#[tokio::test]
async fn slack_errors_become_clear_adapter_errors() {
    let fake = Fake::start().await;
    let a = events_adapter(&fake).await;
    let s = a.sender();
    *fake
        .state
        .fail_with
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some("not_in_channel".into());
    let e = unwrap(
        s.send("slack:T0TEAM:C0OPS", sample_reply())
            .await
            .map(|_| ())
            .err()
            .ok_or("sent"),
    );
    assert_eq!(e.to_string(), "slack chat.postMessage: not_in_channel");
    for (channel, expected) in [
        (
            "slack:T0OTHER:C0OPS",
            "slack: channel slack:T0OTHER:C0OPS: not in workspace T0TEAM",
        ),
        ("#ops", "slack: channel \"#ops\": not a Slack channel id"),
    ] {
        let e = unwrap(
            s.send(channel, sample_reply())
                .await
                .map(|_| ())
                .err()
                .ok_or("sent"),
        );
        assert_eq!(e.to_string(), expected);
    }
    assert_eq!(
        fake.calls("chat.postMessage").len(),
        1,
        "bad channels never reach Slack"
    );

    let mut cfg = fake.events_config(SECRET);
    cfg.bot_token = Some(fleetcmd_gateway::adapters::slack::ConfigSecret::new(
        "xoxb-revoked",
    ));
    let e = unwrap(
        SlackAdapter::connect(&cfg)
            .await
            .map(|_| ())
            .err()
            .ok_or("connected"),
    );
    assert_eq!(e.to_string(), "slack auth.test: invalid_auth");
    assert!(!format!("{e:?}").contains("xoxb"), "{e:?}");
}

#[tokio::test]
async fn rate_limits_wait_for_retry_after() {
    let fake = Fake::start().await;
    let a = events_adapter(&fake).await;
    let s = a.sender();
    fake.state.rate_limit.store(1, Ordering::SeqCst);
    unwrap(s.send("C0OPS", sample_reply()).await);
    let calls = fake.calls("chat.postMessage");
    assert_eq!(
        calls.iter().map(|c| c.status).collect::<Vec<_>>(),
        [429, 200]
    );
    let waited = calls[1].at - calls[0].at;
    assert!(
        waited >= Duration::from_millis(990),
        "Retry-After: 1 honoured: {waited:?}"
    );
    assert_eq!(calls[0].body, calls[1].body, "the same message is retried");

    // A Retry-After beyond the bound fails at once instead of stalling.
    fake.state.rate_limit.store(1, Ordering::SeqCst);
    fake.state.retry_after.store(3600, Ordering::SeqCst);
    let before = Instant::now();
    let e = unwrap(
        s.send("C0OTHER", sample_reply())
            .await
            .map(|_| ())
            .err()
            .ok_or("sent"),
    );
    assert_eq!(
        e.to_string(),
        "slack chat.postMessage: rate limited for 3600 s; not waiting that long"
    );
    assert!(before.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn long_replies_are_cut_at_50_blocks_and_uploaded_in_the_thread() {
    let fake = Fake::start().await;
    let a = events_adapter(&fake).await;
    let reply = Reply {
        header: "output of job 0189 `logs`".into(),
        sections: (0..70)
            .map(|i| Section {
                title: format!("web-{i}"),
                blocks: vec![CodeBlock {
                    label: "stdout".into(),
                    text: (0..40)
                        .map(|l| format!("web-{i} line {l} <!here>\n"))
                        .collect(),
                    omitted_lines: 0,
                }],
                ..Section::default()
            })
            .collect(),
        ..Reply::default()
    };
    let posted = unwrap(a.sender().send("slack:T0TEAM:C0OPS", reply).await);
    let post = &fake.calls("chat.postMessage")[0];
    let blocks = post.body["blocks"].as_array().cloned().unwrap_or_default();
    assert_eq!(blocks.len(), 50);
    let note = blocks[49]["elements"][0]["text"]
        .as_str()
        .unwrap_or_default();
    assert!(
        note.starts_with("… ")
            && note.contains("more lines not shown here")
            && note.contains("fleetcmd-reply.txt"),
        "{note}"
    );

    let get = &fake.calls("files.getUploadURLExternal")[0];
    assert_eq!(get.auth.as_deref(), Some(&*format!("Bearer {BOT_TOKEN}")));
    assert_eq!(get.body["filename"], "fleetcmd-reply.txt");
    let uploads = fake
        .state
        .uploads
        .lock()
        .map(|u| u.clone())
        .unwrap_or_default();
    assert_eq!(uploads.len(), 1);
    let (upload_auth, bytes) = &uploads[0];
    assert_eq!(
        upload_auth, &None,
        "the bot token is not sent to the upload URL"
    );
    assert_eq!(get.body["length"], bytes.len().to_string());
    let text = String::from_utf8_lossy(bytes);
    assert!(
        text.contains("web-69 line 39 <!here>"),
        "the file holds everything, as data"
    );
    let complete = &fake.calls("files.completeUploadExternal")[0];
    assert_eq!(complete.body["channel_id"], "C0OPS");
    assert_eq!(complete.body["thread_ts"], json!(posted.id));
    let files: Value = unwrap(serde_json::from_str(
        complete.body["files"].as_str().unwrap_or(""),
    ));
    assert_eq!(files, json!([{ "id": "F0FILE", "title": "full reply" }]));
}

// ------------------------------------------------------------ HTTP (Events API)

/// `v0=` + hex HMAC-SHA256, computed here with ring directly (not with the
/// adapter's own signer).
pub(crate) fn sign(secret: &str, ts: &str, body: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, format!("v0:{ts}:{body}").as_bytes());
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("v0={hex}")
}

fn now() -> u64 {
    crate::support::now()
}

/// A plain-HTTP test client (reqwest needs a TLS config even so: ring's).
fn client() -> reqwest::Client {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map(|b| {
        b.with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth()
    });
    unwrap(
        reqwest::Client::builder()
            .tls_backend_preconfigured(unwrap(tls))
            .build(),
    )
}

struct Post<'a> {
    path: &'a str,
    body: String,
    content_type: &'a str,
    ts: Option<String>,
    sig: Option<String>,
    retry: Option<&'a str>,
}

impl<'a> Post<'a> {
    fn signed(path: &'a str, body: String, content_type: &'a str) -> Post<'a> {
        let ts = now().to_string();
        let sig = sign(SECRET, &ts, &body);
        Post {
            path,
            body,
            content_type,
            ts: Some(ts),
            sig: Some(sig),
            retry: None,
        }
    }

    fn json(body: &Value) -> Post<'a> {
        Post::signed("/slack/events", body.to_string(), "application/json")
    }

    fn form(path: &'a str, fields: &[(&str, String)]) -> Post<'a> {
        Post::signed(path, form(fields), "application/x-www-form-urlencoded")
    }

    async fn send(self, base: &str) -> (u16, String) {
        let mut req = client()
            .post(format!("{base}{}", self.path))
            .header("content-type", self.content_type)
            .body(self.body);
        if let Some(ts) = self.ts {
            req = req.header("x-slack-request-timestamp", ts);
        }
        if let Some(sig) = self.sig {
            req = req.header("x-slack-signature", sig);
        }
        if let Some(n) = self.retry {
            req = req
                .header("x-slack-retry-num", n)
                .header("x-slack-retry-reason", "http_timeout");
        }
        let resp = unwrap(req.send().await);
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap_or_default())
    }
}

#[tokio::test]
async fn http_requests_without_a_valid_fresh_signature_are_refused() {
    let fake = Fake::start().await;
    let mut a = events_adapter(&fake).await;
    let (base, _) = serve_http(a.routes()).await;
    let event = callback(
        "Ev1",
        message("U0EVE", "C0OPS", "!run reboot on all", "3.1"),
    );
    let body = event.to_string();

    let unsigned = Post {
        ts: None,
        sig: None,
        ..Post::json(&event)
    };
    let (status, text) = unsigned.send(&base).await;
    assert_eq!(
        (status, text.as_str()),
        (401, "refused: missing X-Slack-Request-Timestamp header\n")
    );
    let no_sig = Post {
        sig: None,
        ..Post::json(&event)
    };
    assert_eq!(no_sig.send(&base).await.0, 401);
    let wrong_key = Post {
        sig: Some(sign("guessed-secret", &now().to_string(), &body)),
        ..Post::json(&event)
    };
    let (status, text) = wrong_key.send(&base).await;
    assert_eq!(
        (status, text.as_str()),
        (401, "refused: X-Slack-Signature does not match\n")
    );
    for ts in [now() - 400, now() + 400] {
        let ts = ts.to_string();
        let stale = Post {
            sig: Some(sign(SECRET, &ts, &body)),
            ts: Some(ts),
            ..Post::json(&event)
        };
        let (status, text) = stale.send(&base).await;
        assert_eq!(status, 401);
        assert!(text.contains("stale or replayed"), "{text}");
    }
    // A valid signature over another body.
    let mut tampered = Post::json(&callback(
        "Ev2",
        message("U0ALICE", "C0OPS", "!uptime", "3.2"),
    ));
    tampered.body = body.clone();
    assert_eq!(tampered.send(&base).await.0, 401);
    // Forged clicks and slash commands.
    let click = form(&[(
        "payload",
        block_actions("U0EVE", "fleetcmd_action_0", "approve 0189", "t1").to_string(),
    )]);
    let forged = Post {
        sig: Some(sign("guessed-secret", &now().to_string(), &click)),
        ..Post::signed("/slack/actions", click, "application/x-www-form-urlencoded")
    };
    assert_eq!(forged.send(&base).await.0, 401);
    let slash = Post {
        sig: None,
        ..Post::form(
            "/slack/commands",
            &slash_fields("U0EVE", "eve", "run reboot on all", "t2"),
        )
    };
    assert_eq!(slash.send(&base).await.0, 401);
    // Signed but malformed.
    let bad = Post::signed("/slack/events", "{not json".into(), "application/json");
    let (status, text) = bad.send(&base).await;
    assert_eq!((status, text.as_str()), (400, "malformed JSON\n"));
    let bad = Post::signed(
        "/slack/actions",
        "payload=%7Bnope".into(),
        "application/x-www-form-urlencoded",
    );
    assert_eq!(bad.send(&base).await.0, 400);

    // None of that was routed: the next message delivered is this one.
    let ok = Post::json(&callback(
        "Ev3",
        message("U0ALICE", "C0OPS", "!sentinel", "3.3"),
    ));
    assert_eq!(ok.send(&base).await, (200, String::new()));
    assert_eq!(recv(&mut a).await.text, "!sentinel");
    assert!(
        tokio::time::timeout(Duration::from_millis(200), a.recv())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn http_url_verification_retries_slash_commands_and_clicks() {
    let fake = Fake::start().await;
    let mut a = events_adapter(&fake).await;
    let (base, _) = serve_http(a.routes()).await;

    let challenge = json!({ "token": "Jhj5dZrVaK7ZwHHjRyZWjbDl", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P", "type": "url_verification" });
    let (status, text) = Post::json(&challenge).send(&base).await;
    assert_eq!(status, 200);
    assert_eq!(
        unwrap(serde_json::from_str::<Value>(&text)),
        json!({ "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P" })
    );
    let unsigned = Post {
        sig: None,
        ..Post::json(&challenge)
    };
    assert_eq!(unsigned.send(&base).await.0, 401);

    // Slack retries an event it thinks was not answered: routed once.
    let ev = callback(
        "Ev1",
        message("U0ALICE", "C0OPS", "!run uptime on all", "4.1"),
    );
    assert_eq!(Post::json(&ev).send(&base).await.0, 200);
    let retry = Post {
        retry: Some("1"),
        ..Post::json(&ev)
    };
    assert_eq!(retry.send(&base).await.0, 200);

    // A slash command: the id decides, not the display name "admin".
    let (status, text) = Post::form(
        "/slack/commands",
        &slash_fields("U0MALLORY", "admin", "run reboot on all", "t-1"),
    )
    .send(&base)
    .await;
    assert_eq!(status, 200);
    let ack: Value = unwrap(serde_json::from_str(&text));
    assert_eq!(
        ack,
        json!({ "response_type": "ephemeral", "text": "received `/fleetcmd run reboot on all`" })
    );

    // Clicks: ours with an approve value, then values we never produce.
    let click = |value: &str, action: &str, trigger: &str| {
        Post::form(
            "/slack/actions",
            &[(
                "payload",
                block_actions("U0BOB", action, value, trigger).to_string(),
            )],
        )
    };
    assert_eq!(
        click("approve 01890a5d-ac96", "fleetcmd_action_0", "t-2")
            .send(&base)
            .await
            .0,
        200
    );
    assert_eq!(
        click("run reboot on all", "fleetcmd_action_0", "t-3")
            .send(&base)
            .await
            .0,
        200
    );
    assert_eq!(
        click("approve 1", "other_app_button", "t-4")
            .send(&base)
            .await
            .0,
        200
    );
    assert_eq!(
        Post::json(&callback(
            "Ev9",
            message("U0ALICE", "C0OPS", "!sentinel", "4.9")
        ))
        .send(&base)
        .await
        .0,
        200
    );

    let ops = "slack:T0TEAM:C0OPS";
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(recv(&mut a).await);
    }
    assert_eq!(
        got,
        vec![
            incoming(
                "slack:T0TEAM:U0ALICE",
                ops,
                "!run uptime on all",
                false,
                false
            ),
            incoming(
                "slack:T0TEAM:U0MALLORY",
                ops,
                "run reboot on all",
                true,
                false
            ),
            incoming(
                "slack:T0TEAM:U0BOB",
                ops,
                "approve 01890a5d-ac96",
                true,
                false
            ),
            incoming("slack:T0TEAM:U0ALICE", ops, "!sentinel", false, false),
        ]
    );
}

// ------------------------------------------------------------- end to end

const HOSTILE: &str = "load 0.5 @channel <!here> <!channel> <@U0ALICE>\n```\n!run reboot on all\n<https://evil.example|click me>";

/// The router over the support fake controller, with a policy that binds
/// `slack:T0TEAM:U0ALICE` (and only her) to `oncall`.
fn slack_router() -> Arc<Router<FakeController>> {
    router_for(
        4,
        &POLICY_BODY.replace("console:alice", "slack:T0TEAM:U0ALICE"),
        |c| c.output = HOSTILE.as_bytes().to_vec(),
    )
}

#[tokio::test]
async fn end_to_end_over_http_with_the_router() {
    let fake = Fake::start().await;
    let a = events_adapter(&fake).await;
    let (base, _) = serve_http(a.routes()).await;
    let stop = a.shutdown_handle();
    let router = slack_router();
    let gateway = tokio::spawn(fleetcmd_gateway::serve(router.clone(), a));

    let ev = callback(
        "Ev1",
        message("U0ALICE", "C0OPS", "!run uptime on all", "5.1"),
    );
    assert_eq!(Post::json(&ev).send(&base).await.0, 200);
    eventually("the final edit", || {
        fake.calls("chat.update").iter().any(|c| {
            c.body["text"]
                .as_str()
                .unwrap_or("")
                .contains("succeeded (2/2 ok)")
        })
    })
    .await;
    let post = &fake.calls("chat.postMessage")[0];
    let header = post.body["text"].as_str().unwrap_or_default();
    assert!(
        header.starts_with("job ")
            && header.ends_with("`uptime` on all by slack:T0TEAM:U0ALICE: 2 targets"),
        "{header}"
    );
    let update = fake
        .calls("chat.update")
        .pop()
        .map(|c| c.body)
        .unwrap_or_default();
    assert_eq!(
        update["ts"],
        post.body
            .get("ts")
            .cloned()
            .unwrap_or(json!("1700000000.000001"))
    );
    let blocks = update["blocks"].to_string();
    // The hostile output is there, escaped and fenced.
    assert!(
        blocks.contains("&lt;!here&gt; &lt;!channel&gt; &lt;@U0ALICE&gt;"),
        "{blocks}"
    );
    assert!(
        blocks.contains("&lt;https://evil.example|click me&gt;"),
        "{blocks}"
    );
    assert!(
        !blocks.contains("<!") && !blocks.contains("<@") && !blocks.contains("<http"),
        "{blocks}"
    );
    for b in update["blocks"].as_array().into_iter().flatten() {
        let t = b["text"]["text"].as_str().unwrap_or_default();
        if let Some(inner) = t.split_once("```\n").map(|(_, rest)| rest) {
            let inner = inner.strip_suffix("\n```").unwrap_or(inner);
            assert!(
                !inner.contains("```"),
                "output cannot close its code block: {t}"
            );
        }
    }
    assert_eq!(router.controller().submitted().len(), 1);

    // Mallory calls herself "admin": her id has no role, nothing is run.
    let slash = Post::form(
        "/slack/commands",
        &slash_fields("U0MALLORY", "admin", "run uptime on all", "t-9"),
    );
    assert_eq!(slash.send(&base).await.0, 200);
    eventually("the refusal", || {
        fake.calls("chat.postMessage").iter().any(|c| {
            c.body["text"]
                .as_str()
                .unwrap_or("")
                .contains("asked by slack:T0TEAM:U0MALLORY")
        })
    })
    .await;
    let refusal = fake
        .calls("chat.postMessage")
        .pop()
        .map(|c| c.body)
        .unwrap_or_default();
    assert!(
        refusal["text"]
            .as_str()
            .unwrap_or("")
            .contains("you have no roles"),
        "{refusal}"
    );
    assert_eq!(router.controller().submitted().len(), 1);

    stop.shutdown();
    unwrap(
        tokio::time::timeout(Duration::from_secs(5), gateway)
            .await
            .map_err(|_| "serve did not end"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

// ---------------------------------------------------------------- rendering

fn job_result() -> Reply {
    render::job(&failed_job(
        "uptime",
        "slack:T0TEAM:U0ALICE",
        HOSTILE.as_bytes(),
        1,
        b"uptime: /proc/loadavg: No such file or directory\n@here `rm -rf` & more",
    ))
}

fn approval_request() -> Reply {
    Reply {
        header:
            "job b302099a8057 `reboot` on role=web needs 1 approval — asked by slack:T0TEAM:U0ALICE"
                .into(),
        lines: vec![
            "approvers: role oncall, not the requester; expires in 15 min".into(),
            "or type `approve b302099a8057` / `deny b302099a8057 <reason>`".into(),
        ],
        actions: vec![
            Action {
                label: "Approve".into(),
                command: "approve b302099a8057".into(),
                danger: false,
            },
            Action {
                label: "Deny".into(),
                command: "deny b302099a8057".into(),
                danger: true,
            },
        ],
        ..Reply::default()
    }
}

fn pretty(r: &blocks::Rendered) -> String {
    unwrap(serde_json::to_string_pretty(
        &json!({ "text": r.text, "blocks": r.blocks }),
    ))
}

#[test]
fn job_result_block_kit() {
    let r = blocks::render(&job_result());
    assert!(r.overflow.is_none());
    let text = pretty(&r);
    assert!(!text.contains("<!") && !text.contains("<@"), "{text}");
    insta::assert_snapshot!("slack_job_result", text);
}

#[test]
fn approval_request_block_kit() {
    let r = blocks::render(&approval_request());
    let buttons = &r.blocks[r.blocks.len() - 1];
    assert_eq!(buttons["elements"][0]["style"], "primary");
    assert_eq!(buttons["elements"][1]["style"], "danger");
    assert_eq!(buttons["elements"][1]["value"], "deny b302099a8057");
    // What a click sends back is accepted by the click filter.
    for b in buttons["elements"].as_array().into_iter().flatten() {
        assert!(fleetcmd_gateway::adapters::slack::is_approval_command(
            b["value"].as_str().unwrap_or("")
        ));
    }
    insta::assert_snapshot!("slack_approval_request", pretty(&r));
}

/// A Slack events gateway on the state directory `dir`, served the way the
/// gateway serves it; stop it by sending on the returned channel.
async fn events_gateway_on(
    fake: &Fake,
    dir: &std::path::Path,
) -> (
    String,
    SlackAdapter,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
    tokio::sync::mpsc::Receiver<fleetcmd_gateway::adapters::AuthFailure>,
) {
    let store = unwrap(fleetcmd_gateway::store::GatewayStore::open(dir));
    let a = events_adapter(fake).await;
    a.use_replay_guard(unwrap(store.replay()));
    let (failures, reports) = fleetcmd_gateway::adapters::AuthFailures::channel(16);
    a.report_auth_failures(failures);
    let listener = unwrap(tokio::net::TcpListener::bind("127.0.0.1:0").await);
    let addr = unwrap(listener.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(fleetcmd_gateway::http::serve(listener, a.routes(), async {
        let _ = stopped.await;
    }));
    (format!("http://{addr}"), a, stop, server, reports)
}

#[tokio::test]
async fn a_signed_event_replayed_after_a_gateway_restart_is_refused_and_reported() {
    let fake = Fake::start().await;
    let dir = unwrap(tempfile::tempdir());
    // The request as captured from the wire: same body, timestamp, signature.
    let captured = Post::json(&callback(
        "EvReplay",
        message("U0ALICE", "C0OPS", "!run uptime on all", "7.1"),
    ));
    let (body, ts, sig) = (
        captured.body.clone(),
        captured.ts.clone(),
        captured.sig.clone(),
    );
    let replayed = || Post {
        path: "/slack/events",
        body: body.clone(),
        content_type: "application/json",
        ts: ts.clone(),
        sig: sig.clone(),
        retry: None,
    };

    let (base, mut a, stop, server, mut reports) = events_gateway_on(&fake, dir.path()).await;
    assert_eq!(captured.send(&base).await.0, 200);
    assert_eq!(recv(&mut a).await.text, "!run uptime on all");
    let _ = stop.send(());
    unwrap(unwrap(server.await));
    drop(a);
    assert!(reports.try_recv().is_err(), "nothing refused yet");

    // A new gateway on the same state directory.
    let (base, mut a, stop, server, mut reports) = events_gateway_on(&fake, dir.path()).await;
    assert_eq!(replayed().send(&base).await.0, 200);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), a.recv())
            .await
            .is_err(),
        "the replayed event was routed"
    );
    let f = unwrap(reports.try_recv());
    assert_eq!(
        (f.adapter.as_str(), f.source.as_str(), f.detail.as_str()),
        (
            "slack",
            "/slack/events",
            "request refused: replayed event (already handled)"
        )
    );
    let _ = stop.send(());
    unwrap(unwrap(server.await));
}
