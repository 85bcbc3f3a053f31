//! Every adapter at once (issue 5: "fleetcmd-gateway runs with a
//! gateway.toml that enables any set of adapters at once"): ONE
//! [`Gateway`] with ONE router over the support fake controller serves a
//! real ngircd, a real prosody, a fake Slack (Events API over the gateway's
//! HTTP listener), a fake Mattermost (REST + WebSocket), a fake Campfire and
//! a generic incoming webhook, the webhook-based ones on one HTTP listener.
//! One user per platform asks `!whoami` and `!run uptime on all` at the
//! same time; each answer must come back on that user's platform, naming
//! that platform's identity and no other's, and the controller must see
//! one job from each requester. A webhook request with a bad signature is
//! reported once, through the gateway's shared auth-failure reporter.
//!
//! The servers and fakes are the ones of each adapter's own tests
//! (irc.rs, prosody.rs, slack_fake.rs, mattermost.rs, campfire.rs, webhook.rs).

use fleetcmd_gateway::adapters::HttpInbound;
use std::time::Duration;

use axum::http::StatusCode;
use fleetcmd_core::job::JobSpec;
use fleetcmd_gateway::Gateway;
use fleetcmd_gateway::adapters::campfire::CampfireAdapter;
use fleetcmd_gateway::adapters::irc::IrcAdapter;
use fleetcmd_gateway::adapters::mattermost::MattermostAdapter;
use fleetcmd_gateway::adapters::slack::SlackAdapter;
use fleetcmd_gateway::adapters::webhook::{WebhookAdapter, WebhookConfig};
use fleetcmd_gateway::adapters::xmpp::XmppAdapter;
use fleetcmd_gateway::router::Router;
use serde_json::json;
use tokio::time::{Instant, sleep, timeout};

use crate::support::FakeController;
use crate::{campfire, irc, mattermost, prosody, slack, support, webhook};

/// The whole test, servers included, finishes well within this.
const TEST_TIMEOUT: Duration = Duration::from_secs(40);
/// One expected answer.
const WAIT: Duration = Duration::from_secs(10);
const SLACK_SECRET: &str = "multi-slack-signing-secret";

const IRC_ID: &str = "irc:test:alice!~alice@127.0.0.1";
const XMPP_ID: &str = "xmpp:alice@localhost";
const SLACK_ID: &str = "slack:T0TEAM:U0ALICE";
const WEBHOOK_ID: &str = "webhook:ops:alice";
const CAMPFIRE_ID: &str = "campfire:acme:42";

fn mattermost_id() -> String {
    format!("mattermost:test:{}", mattermost::ALICE)
}

/// Every platform's identity of its user, with the channel the command
/// is sent in (as RBAC and the signed job name it).
fn identities() -> Vec<(String, String)> {
    vec![
        (IRC_ID.to_string(), "irc:test:#ops".to_string()),
        (XMPP_ID.to_string(), format!("xmpp:{}", prosody::OPS)),
        (SLACK_ID.to_string(), "slack:T0TEAM:C0OPS".to_string()),
        (
            mattermost_id(),
            format!("mattermost:test:{}", mattermost::CHANNEL),
        ),
        (WEBHOOK_ID.to_string(), "webhook:ops:#ops".to_string()),
        (CAMPFIRE_ID.to_string(), "campfire:acme:12".to_string()),
    ]
}

/// The support policy plus one binding that gives each platform's user
/// (and only them) the `oncall` role.
fn bindings() -> String {
    format!(
        r#"
[[bindings]]
subjects = [
  "irc:test:alice!~alice@*",
  "{XMPP_ID}",
  "{SLACK_ID}",
  "{}",
  "{WEBHOOK_ID}",
  "{CAMPFIRE_ID}",
]
roles = ["oncall"]
"#,
        mattermost_id()
    )
}

/// `texts` (what one platform's user received) name `own` and no other
/// platform's identity.
fn only_names(platform: &str, own: &str, texts: &[String]) {
    let all = texts.join("\n");
    assert!(all.contains(own), "{platform}: {own} not named in {all}");
    for (other, _) in identities() {
        if other != own {
            assert!(
                !all.contains(&other),
                "{platform}: another platform's user {other} leaked into {all}"
            );
        }
    }
}

/// Polls `f` every 10 ms for up to [`WAIT`].
async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(10)).await;
    }
}

/// The first Slack Web API call (post or edit) whose body contains `needle`.
async fn slack_post(fake: &slack::fake::Fake, needle: &str) -> slack::fake::Call {
    eventually(&format!("a Slack post with {needle}"), || {
        fake.calls("chat.postMessage")
            .into_iter()
            .chain(fake.calls("chat.update"))
            .find(|c| c.body.to_string().contains(needle))
    })
    .await
}

fn auth_failures(router: &Router<FakeController>) -> Vec<(String, String, String, String)> {
    router
        .controller()
        .reported()
        .into_iter()
        .filter(|(kind, ..)| kind == "auth_failed")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gateway_serves_every_adapter_at_once_on_one_router() {
    if timeout(TEST_TIMEOUT, every_adapter_at_once())
        .await
        .is_err()
    {
        panic!("test did not finish within {TEST_TIMEOUT:?}");
    }
}

async fn every_adapter_at_once() {
    // ---- the chat servers: real ngircd and prosody, local fakes
    let (ngircd, prosody) = tokio::join!(
        crate::ngircd::Ngircd::start(None),
        prosody::Prosody::start()
    );
    let slack_fake = slack::fake::Fake::start().await;
    let (mm_fake, mm_base) = mattermost::start_fake().await;
    let (campfire_fake, campfire_url, _campfire_task) = campfire::fake_campfire().await;

    // ---- one gateway: one router, one HTTP listener
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let gw_url = format!(
        "http://{}",
        listener.local_addr().unwrap_or_else(|e| panic!("{e}"))
    );
    let router = support::router_with_extra(&bindings(), |_| {});
    let mut gw = Gateway::new(router.clone());

    let mut irc_alice = irc::Client::connect(ngircd.port, "alice", "alice").await;
    irc_alice.join("#ops").await;
    let irc_bot = IrcAdapter::connect(&irc::bot_config(ngircd.port))
        .await
        .unwrap_or_else(|e| panic!("irc connect: {e}"));
    gw.add(irc_bot);

    let xmpp_bot = XmppAdapter::connect(&prosody.bot_config(&[prosody::OPS]))
        .await
        .unwrap_or_else(|e| panic!("xmpp connect: {e}"));
    assert!(
        xmpp_bot
            .wait_joined(&[prosody::jid(prosody::OPS)], WAIT)
            .await,
        "the bot joined only {:?}",
        xmpp_bot.joined_rooms()
    );
    gw.add(xmpp_bot);

    let slack_bot = SlackAdapter::connect(&slack_fake.events_config(SLACK_SECRET))
        .await
        .unwrap_or_else(|e| panic!("slack connect: {e}"));
    slack_bot.report_auth_failures(gw.auth_failures());
    gw.add_routes(slack_bot.routes());
    gw.add(slack_bot);

    let mm_cfg = mattermost::config(&mm_base, &format!("{gw_url}/mattermost/actions"), "");
    let mm_bot = timeout(WAIT, MattermostAdapter::connect(&mm_cfg))
        .await
        .unwrap_or_else(|_| panic!("mattermost connect timed out"))
        .unwrap_or_else(|e| panic!("mattermost connect: {e}"));
    mm_bot.report_auth_failures(gw.auth_failures());
    gw.add_routes(mm_bot.routes());
    gw.add(mm_bot);

    let campfire_bot = CampfireAdapter::new(&campfire::config(&campfire_url, campfire::BOT_KEY))
        .unwrap_or_else(|e| panic!("campfire: {e}"));
    campfire_bot.report_auth_failures(gw.auth_failures());
    gw.add_routes(campfire_bot.routes());
    gw.add(campfire_bot);

    let hook_bot = WebhookAdapter::new(&WebhookConfig {
        incoming: vec![webhook::hook(None, 3000)],
        outgoing: vec![],
    })
    .unwrap_or_else(|e| panic!("webhook: {e}"));
    hook_bot.report_auth_failures(gw.auth_failures());
    gw.add_routes(hook_bot.routes());
    gw.add(hook_bot);

    assert!(gw.needs_http());
    let running = tokio::spawn(gw.run(Some(listener)));

    // The bot is in its IRC channel, and the Mattermost socket is live.
    irc_alice
        .until(10, "the bot joining #ops", |l| {
            l.command == "JOIN" && l.nick == "fleetcmd"
        })
        .await;
    mattermost::live(&mm_fake, 1).await;
    let mut xmpp_alice = prosody::User::login(&prosody, "alice").await;
    xmpp_alice.join(prosody::OPS, "alice").await;

    // ---- every platform's user at the same time
    let irc_user = async {
        irc_alice.send("PRIVMSG #ops :!whoami").await;
        let mut got = irc::texts(&irc_alice.bot_lines("fleetcmd", "#ops", 2, 10).await);
        assert_eq!(
            got,
            [format!("you are {IRC_ID}"), "· roles: oncall".to_string()]
        );
        irc_alice.send("PRIVMSG #ops :!run uptime on all").await;
        let run = irc::texts(&irc_alice.bot_lines("fleetcmd", "#ops", 2, 10).await);
        assert!(
            run[0].ends_with(&format!("`uptime` on all by {IRC_ID}: 2 targets")),
            "{run:?}"
        );
        assert!(
            run[1].contains(&format!("succeeded (2/2 ok) — asked by {IRC_ID}")),
            "{run:?}"
        );
        got.extend(run);
        only_names("irc", IRC_ID, &got);
    };

    let xmpp_user = async {
        xmpp_alice.say(prosody::OPS, "!whoami").await;
        let who = xmpp_alice.bot_reply(prosody::OPS, "you are").await;
        let who = prosody::body_of(&who).unwrap_or_default();
        assert_eq!(who, format!("you are {XMPP_ID}\n  roles: oncall"));
        xmpp_alice.say(prosody::OPS, "!run uptime on all").await;
        let posted = xmpp_alice.bot_reply(prosody::OPS, "2 targets").await;
        let posted = prosody::body_of(&posted).unwrap_or_default();
        assert!(
            posted.contains(&format!("`uptime` on all by {XMPP_ID}")),
            "{posted}"
        );
        let done = xmpp_alice.bot_reply(prosody::OPS, "succeeded").await;
        let done = prosody::body_of(&done).unwrap_or_default();
        assert!(
            done.contains(&format!("succeeded (2/2 ok) — asked by {XMPP_ID}")),
            "{done}"
        );
        only_names("xmpp", XMPP_ID, &[who, posted, done]);
    };

    let slack_user = async {
        let client = campfire::client();
        let post = |event_id: &'static str, text: &'static str, ts: &'static str| {
            let body =
                slack::callback(event_id, slack::message("U0ALICE", "C0OPS", text, ts)).to_string();
            let stamp = crate::support::now().to_string();
            client
                .post(format!("{gw_url}/slack/events"))
                .header("content-type", "application/json")
                .header("x-slack-request-timestamp", &stamp)
                .header(
                    "x-slack-signature",
                    slack::sign(SLACK_SECRET, &stamp, &body),
                )
                .body(body)
                .send()
        };
        let sent = post("EvWho", "!whoami", "7.1")
            .await
            .unwrap_or_else(|e| panic!("slack event: {e}"));
        assert_eq!(sent.status(), StatusCode::OK);
        let who = slack_post(&slack_fake, &format!("you are {SLACK_ID}")).await;
        assert_eq!(who.body["channel"], "C0OPS");
        let sent = post("EvRun", "!run uptime on all", "7.2")
            .await
            .unwrap_or_else(|e| panic!("slack event: {e}"));
        assert_eq!(sent.status(), StatusCode::OK);
        slack_post(
            &slack_fake,
            &format!("`uptime` on all by {SLACK_ID}: 2 targets"),
        )
        .await;
        slack_post(
            &slack_fake,
            &format!("succeeded (2/2 ok) — asked by {SLACK_ID}"),
        )
        .await;
        let all: Vec<String> = slack_fake
            .calls("chat.postMessage")
            .into_iter()
            .chain(slack_fake.calls("chat.update"))
            .map(|c| c.body.to_string())
            .collect();
        only_names("slack", SLACK_ID, &all);
    };

    let mm_user = async {
        let me = mattermost_id();
        mattermost::say(&mm_fake, "mmwho", mattermost::ALICE, "!whoami", json!({}));
        let who = mattermost::post_containing(&mm_fake, &format!("you are {me}")).await;
        assert_eq!(who.body["channel_id"], mattermost::CHANNEL);
        mattermost::say(
            &mm_fake,
            "mmrun",
            mattermost::ALICE,
            "!run uptime on all",
            json!({}),
        );
        // Markdown in the header is escaped (`\``).
        mattermost::post_containing(&mm_fake, &format!("\\`uptime\\` on all by {me}: 2 targets"))
            .await;
        let done = format!("succeeded (2/2 ok) — asked by {me}");
        eventually("the Mattermost result edit", || {
            mm_fake.patches().into_iter().find(|p| {
                p.body["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(&done))
            })
        })
        .await;
        let all: Vec<String> = mm_fake
            .posts()
            .into_iter()
            .chain(mm_fake.patches())
            .map(|p| p.body.to_string())
            .collect();
        only_names("mattermost", &me, &all);
    };

    let hook_url = format!("{gw_url}/webhook/ops");
    let webhook_user = async {
        let who = webhook::post_signed(
            &hook_url,
            webhook::SECRET,
            webhook::now(),
            webhook::line("alice", "#ops", "!whoami"),
        )
        .await;
        assert_eq!(who.status, StatusCode::OK, "{}", who.body);
        assert_eq!(
            webhook::parse(&who.body)["reply"]["header"],
            format!("you are {WEBHOOK_ID}")
        );
        let run = webhook::post_signed(
            &hook_url,
            webhook::SECRET,
            webhook::now(),
            webhook::line("alice", "#ops", "!run uptime on all"),
        )
        .await;
        assert_eq!(run.status, StatusCode::OK, "{}", run.body);
        let reply = webhook::parse(&run.body);
        let header = reply["reply"]["header"].as_str().unwrap_or_default();
        assert!(
            header.ends_with(&format!("`uptime` on all by {WEBHOOK_ID}: 2 targets")),
            "{header}"
        );
        only_names("webhook", WEBHOOK_ID, &[who.body, run.body]);
    };

    let campfire_user = async {
        let who = campfire::deliver(
            &gw_url,
            campfire::TOKEN,
            campfire::bytes(&campfire::payload(42, "Alice", "!whoami")),
        )
        .await;
        assert_eq!(who.status, StatusCode::OK, "{}", who.body);
        assert!(
            who.body.contains(&format!("you are {CAMPFIRE_ID}")),
            "{}",
            who.body
        );
        let run = campfire::deliver(
            &gw_url,
            campfire::TOKEN,
            campfire::bytes(&campfire::payload(42, "Alice", "!run uptime on all")),
        )
        .await;
        assert_eq!(run.status, StatusCode::OK, "{}", run.body);
        assert!(
            run.body
                .contains(&format!("`uptime` on all by {CAMPFIRE_ID}: 2 targets")),
            "{}",
            run.body
        );
        // The final result is posted to the room through the bot API.
        let done = eventually("the result posted to the Campfire room", || {
            campfire_fake
                .posted()
                .into_iter()
                .find(|p| p.body.contains("succeeded (2/2 ok)"))
        })
        .await;
        assert!(
            done.body
                .contains(&format!("succeeded (2/2 ok) — asked by {CAMPFIRE_ID}")),
            "{}",
            done.body
        );
        let mut all = vec![who.body, run.body];
        all.extend(campfire_fake.posted().into_iter().map(|p| p.body));
        only_names("campfire", CAMPFIRE_ID, &all);
    };

    tokio::join!(
        irc_user,
        xmpp_user,
        slack_user,
        mm_user,
        webhook_user,
        campfire_user
    );

    // ---- the controller saw one signed job from each requester, each
    // from its own channel
    let mut jobs: Vec<(String, String)> = router
        .controller()
        .submitted()
        .iter()
        .map(|j| {
            let spec = JobSpec::from_bytes(&j.spec).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(spec.command, "uptime");
            (spec.requester.as_str().to_string(), spec.channel)
        })
        .collect();
    jobs.sort();
    let mut want = identities();
    want.sort();
    assert_eq!(jobs, want);
    assert!(
        auth_failures(&router).is_empty(),
        "{:?}",
        auth_failures(&router)
    );

    // ---- a forged webhook request: refused, never routed, reported once
    // through the shared reporter
    let forged = webhook::post_signed(
        &hook_url,
        "not-the-secret-0123456789",
        webhook::now(),
        webhook::line("alice", "#ops", "!run uptime on all"),
    )
    .await;
    assert_eq!(forged.status, StatusCode::UNAUTHORIZED, "{}", forged.body);
    eventually("the auth failure in the audit trail", || {
        (!auth_failures(&router).is_empty()).then_some(())
    })
    .await;
    // Nothing else arrives later (another adapter, a duplicate).
    sleep(Duration::from_millis(300)).await;
    assert_eq!(
        auth_failures(&router),
        [(
            "auth_failed".to_string(),
            "webhook:ops /webhook/ops".to_string(),
            String::new(),
            "signature does not match (401)".to_string(),
        )]
    );
    assert_eq!(router.controller().submitted().len(), want.len());

    running.abort();
    let _ = running.await;
    drop((ngircd, prosody));
}
