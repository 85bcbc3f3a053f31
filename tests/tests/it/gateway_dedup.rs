//! Several gateways on one chat act once (issue 19): two real
//! `fleetcmd-gateway` processes, each with its own `state_dir`, on one
//! controller, both serving one Slack app in events mode and posting to a
//! local Slack (the Web API methods the adapter calls, `{"ok": …}`
//! answers). The same signed Slack event delivered to both at once, and
//! Slack's retries of it (`X-Slack-Retry-Num`) to both, run one job and get
//! one reply; one health alert is posted to its channel once. What decides
//! is the controller's `Claims` service: each gateway's local replay record
//! says "new" for the event it has not seen.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use fleetcmd_gateway::adapters::xmpp::stanza::NS_CORRECT;
use fleetcmd_gateway::adapters::xmpp::xml::Element;
use fleetcmd_proto::v1 as pb;
use fleetcmd_tests::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::docs::IrcUser;
use crate::failover::free_port;
use crate::gateway_restart::Gateway;
use crate::prosody::{BOT, NICK, OPS, PASSWORD, Prosody, User, body_of, bot_said_in, from_of};
use crate::synapse::{self, Synapse, text_of};

const TEAM: &str = "T0TEAM";
const BOT_USER: &str = "U0BOT";
const BOT_TOKEN: &str = "xoxb-dedup-bot-token";
const SECRET: &str = "dedup-signing-secret";
const WAIT: Duration = Duration::from_secs(30);
/// What a gateway logs when another one claimed a request first.
const LOST: &str = "request handled by another gateway";
/// What a gateway logs once its alert stream is open.
const FOLLOWING: &str = "alerts: following the controller's health stream";

/// Web API calls the local Slack received: (method, body).
type Calls = Arc<Mutex<Vec<(String, Value)>>>;

struct FakeSlack {
    base: String,
    calls: Calls,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeSlack {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeSlack {
    async fn start() -> FakeSlack {
        let calls = Calls::default();
        let app = axum::Router::new()
            .route("/api/{method}", post(api))
            .with_state(calls.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the local Slack");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeSlack { base, calls, task }
    }

    /// Calls of `method` about `channel`.
    fn calls(&self, method: &str, channel: &str) -> Vec<Value> {
        self.calls
            .lock()
            .expect("calls")
            .iter()
            .filter(|(m, b)| m == method && b["channel"] == channel)
            .map(|(_, b)| b.clone())
            .collect()
    }
}

/// The methods the adapter calls, answered as Slack does.
async fn api(
    State(calls): State<Calls>,
    UrlPath(method): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Bearer {BOT_TOKEN}")) {
        return axum::Json(json!({ "ok": false, "error": "invalid_auth" })).into_response();
    }
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let answer = {
        let mut calls = calls.lock().expect("calls");
        calls.push((method.clone(), parsed.clone()));
        match method.as_str() {
            "auth.test" => {
                json!({ "ok": true, "team_id": TEAM, "user_id": BOT_USER, "bot_id": "B0BOT", "team": "Acme", "user": "fleetcmd" })
            }
            "chat.postMessage" => {
                json!({ "ok": true, "channel": parsed["channel"], "ts": format!("1700000000.{:06}", calls.len()) })
            }
            "chat.update" => {
                json!({ "ok": true, "channel": parsed["channel"], "ts": parsed["ts"] })
            }
            _ => json!({ "ok": false, "error": "unknown_method" }),
        }
    };
    axum::Json(answer).into_response()
}

/// `v0=` + hex HMAC-SHA256 over `v0:TS:BODY`, as Slack signs.
fn sign(ts: &str, body: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let tag = ring::hmac::sign(&key, format!("v0:{ts}:{body}").as_bytes());
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("v0={hex}")
}

/// POSTs a signed Events API request to `port` (a retry when `retry` is
/// set), over plain HTTP/1.1; the status code.
async fn deliver(port: u16, body: &str, retry: Option<u32>) -> u16 {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
        .to_string();
    let mut req = format!(
        "POST /slack/events HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nx-slack-request-timestamp: {ts}\r\nx-slack-signature: {}\r\nconnection: close\r\n",
        body.len(),
        sign(&ts, body)
    );
    if let Some(n) = retry {
        req.push_str(&format!(
            "x-slack-retry-num: {n}\r\nx-slack-retry-reason: http_timeout\r\n"
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("gateway listens");
    conn.write_all(req.as_bytes()).await.expect("request sent");
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.expect("answer read");
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"))
}

/// The dev policy, with the chat users matching `subjects` (`slack:T…:*`)
/// as admins, vouched for by the gateway.
async fn push_policy_for(fleet: &mut TestFleet, subjects: &str) {
    let text = fleetcmd_cli::fleet::example_policy(
        fleet.policy_version + 1,
        &fleet.gateway_key.public_key(),
        &fleet.operator_key.public_key(),
    )
    .replace(
        "subjects = [\"console:*\", \"cli:*\"]",
        &format!("subjects = [\"console:*\", \"cli:*\", \"{subjects}\"]"),
    )
    .replace(
        "vouches_for = [\"console:*\"]",
        &format!("vouches_for = [\"console:*\", \"{subjects}\"]"),
    );
    fleet.fleet.push_policy(&text).await.expect("policy pushed");
}

/// The dev policy, with Slack users of the test team as admins.
async fn push_slack_policy(fleet: &mut TestFleet) {
    push_policy_for(fleet, &format!("slack:{TEAM}:*")).await;
}

/// A gateway.toml for `fleet` with Slack in events mode on `port`, its
/// state in `state` (each gateway its own).
fn slack_gateway_config(fleet: &TestFleet, slack: &FakeSlack, state: &Path, port: u16) -> PathBuf {
    let text = format!(
        r#"{head}
[http]
listen = "127.0.0.1:{port}"

[slack]
mode = "events"
bot_token = "{BOT_TOKEN}"
signing_secret = "{SECRET}"
api_base = "{base}/api"
team_id = "{TEAM}"
"#,
        head = crate::gateway_restart::gateway_toml_head(fleet, state),
        base = slack.base,
    );
    let path = fleet.path().join(format!("gateway-{port}.toml"));
    std::fs::write(&path, text).expect("gateway.toml written");
    // It holds the Slack secrets inline: private, as the gateway requires.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod gateway.toml");
    }
    path
}

/// Two gateways on one Slack app and one controller, both listening.
async fn two_gateways(fleet: &TestFleet, slack: &FakeSlack) -> [(Gateway, u16); 2] {
    let start = |name: &str| {
        let port = free_port();
        let state = fleet.path().join(name);
        let config = slack_gateway_config(fleet, slack, &state, port);
        (Gateway::start(&config, "nobody"), port)
    };
    let gateways = [start("gateway-a"), start("gateway-b")];
    for (gw, port) in &gateways {
        gw.logged("HTTP listener for chat webhooks", 1).await;
        assert_eventually(WAIT, || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", *port))
                .await
                .ok()
        })
        .await;
    }
    gateways
}

/// Waits for `check` like `assert_eventually`, naming `what` and showing
/// both gateways' logs when it does not come.
async fn wait_for<T, Fut: std::future::Future<Output = Option<T>>>(
    what: &str,
    gateways: [&Gateway; 2],
    mut check: impl FnMut() -> Fut,
) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < WAIT,
            "no {what} within {WAIT:?}; gateway a:\n{}\ngateway b:\n{}",
            gateways[0].stderr(),
            gateways[1].stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn message_event(event_id: &str, text: &str, ts: &str) -> String {
    json!({
        "token": "XXYYZZ", "team_id": TEAM, "api_app_id": "A0APP", "type": "event_callback",
        "event_id": event_id, "event_time": 1_700_000_000,
        "authorizations": [{ "team_id": TEAM, "user_id": BOT_USER, "is_bot": true }],
        "event": {
            "type": "message", "user": "U0ALICE", "text": text, "ts": ts,
            "channel": "C0OPS", "channel_type": "channel", "team": TEAM,
        },
    })
    .to_string()
}

async fn jobs_of(fleet: &TestFleet, requester: &str) -> Vec<pb::Job> {
    pb::jobs_client::JobsClient::new(fleet.operator().await)
        .list(pb::ListJobsRequest {
            limit: 100,
            requester: requester.into(),
            state: String::new(),
        })
        .await
        .expect("jobs listed")
        .into_inner()
        .jobs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_slack_event_delivered_to_two_gateways_and_retried_runs_once_with_one_reply() {
    let mut fleet = start_fleet(1).await;
    push_slack_policy(&mut fleet).await;
    let slack = FakeSlack::start().await;
    let [(a, port_a), (b, port_b)] = two_gateways(&fleet, &slack).await;

    // The same delivery to both gateways at once (two Event Subscription
    // URLs behind a load balancer that retried elsewhere, say).
    let event = message_event(
        "Ev0DEDUP01",
        "!run echo dedup-once on all",
        "1700000001.000100",
    );
    let (sa, sb) = tokio::join!(deliver(port_a, &event, None), deliver(port_b, &event, None));
    assert_eq!((sa, sb), (200, 200));
    // Exactly one of them lost the claim and said so in its log.
    let lost = wait_for("lost claim in a log", [&a, &b], || async {
        let n = [&a, &b]
            .iter()
            .filter(|g| g.stderr().contains(LOST))
            .count();
        (n > 0).then_some(n)
    })
    .await;
    assert_eq!(lost, 1, "a:\n{}\nb:\n{}", a.stderr(), b.stderr());
    // Slack's retries of it, to both: new requests (fresh signatures), the
    // same event; acted on by nobody.
    for (n, port) in [(1, port_a), (1, port_b), (2, port_b), (2, port_a)] {
        assert_eq!(deliver(port, &event, Some(n)).await, 200);
    }

    let requester = format!("slack:{TEAM}:U0ALICE");
    let job = wait_for("finished job", [&a, &b], || {
        let (fleet, requester) = (&fleet, &requester);
        async move {
            let jobs = jobs_of(fleet, requester).await;
            jobs.into_iter().find(fleetcmd_cli::client::is_finished)
        }
    })
    .await;
    // The result reached the chat: the one message edited with it.
    let short = fleetcmd_core::ids::short_form(&job.job_id);
    wait_for("result edited into the reply", [&a, &b], || {
        let (slack, short) = (&slack, &short);
        async move {
            slack
                .calls("chat.update", "C0OPS")
                .iter()
                .any(|c| c.to_string().contains(&**short))
                .then_some(())
        }
    })
    .await;
    // Another event of the same text is another request: it runs, so the
    // gateways are not simply refusing everything after the first.
    let again = message_event(
        "Ev0DEDUP02",
        "!run echo dedup-once on all",
        "1700000002.000100",
    );
    let (sa, sb) = tokio::join!(deliver(port_b, &again, None), deliver(port_a, &again, None));
    assert_eq!((sa, sb), (200, 200));
    let jobs = wait_for("two finished jobs", [&a, &b], || {
        let (fleet, requester) = (&fleet, &requester);
        async move {
            let jobs = jobs_of(fleet, requester).await;
            (jobs.len() >= 2 && jobs.iter().all(fleetcmd_cli::client::is_finished)).then_some(jobs)
        }
    })
    .await;
    // Both gateways have decided on every delivery (each lost one claim of
    // the two events, or acted on it): the counts are final.
    wait_for("second lost claim", [&a, &b], || async {
        (a.stderr().matches(LOST).count() + b.stderr().matches(LOST).count() == 2).then_some(())
    })
    .await;
    assert_eq!(jobs.len(), 2, "one job per event: {jobs:#?}");
    // Each job's reply, once.
    wait_for("a reply to each job", [&a, &b], || async {
        let posts = slack.calls("chat.postMessage", "C0OPS");
        jobs.iter()
            .all(|j| {
                let short = fleetcmd_core::ids::short_form(&j.job_id);
                posts.iter().any(|p| p.to_string().contains(&*short))
            })
            .then_some(())
    })
    .await;
    let posts = slack.calls("chat.postMessage", "C0OPS");
    assert_eq!(
        posts.len(),
        2,
        "one reply per event, the result edited into it: {posts:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_health_alert_is_posted_once_by_two_gateways() {
    let dir = tempfile::tempdir().expect("temp dir");
    let plugin = dir.path().join("check_app");
    std::fs::write(&plugin, crate::health::PLUGIN).expect("plugin");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let state = dir.path().join("dev-1.state");
    let channel = format!("slack:{TEAM}:C0ALERTS");
    let fleet = start_fleet_with(1, |o| {
        o.services = crate::health::services_in(&channel, "confirm = \"1s\"");
        o.agent_checks.insert(
            "dev-1".to_string(),
            vec![crate::health::check(&plugin, &state)],
        );
    })
    .await;
    assert_eventually(WAIT, || async {
        crate::health::service(&fleet)
            .await
            .filter(|s| s.state == "ok")
    })
    .await;
    let slack = FakeSlack::start().await;
    let [(a, _), (b, _)] = two_gateways(&fleet, &slack).await;
    // Both follow the alert stream before anything happens.
    for gw in [&a, &b] {
        gw.logged(FOLLOWING, 1).await;
    }

    crate::health::set(&state, 2);
    let down = wait_for("alert post", [&a, &b], || async {
        let posts = slack.calls("chat.postMessage", "C0ALERTS");
        (!posts.is_empty()).then_some(posts)
    })
    .await;
    // The other gateway decided too: it lost the claim and logged it.
    wait_for("lost alert claim in a log", [&a, &b], || async {
        [&a, &b]
            .iter()
            .any(|g| g.stderr().contains("alerts: posted by another gateway"))
            .then_some(())
    })
    .await;
    let posts = slack.calls("chat.postMessage", "C0ALERTS");
    assert_eq!(posts.len(), 1, "posted once: {posts:#?}");
    assert!(
        down[0].to_string().contains("api is down"),
        "{:#?}",
        down[0]
    );
}

/// `Claims.Claim` answers gateway certificates only: the first claim of a
/// key wins and the next loses; bad keys and times to live are refused
/// with what was wrong; agent, operator and anonymous callers are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_gateways_claim_and_the_first_claim_of_a_key_wins() {
    use pb::claims_client::ClaimsClient;
    use tonic::Code;
    let fleet = start_fleet(1).await;
    let claim = |key: &str, ttl_secs: u32| pb::ClaimRequest {
        key: key.into(),
        ttl_secs,
    };
    let mut gateway = ClaimsClient::new(fleet.gateway().await);
    let won = |r: Result<tonic::Response<pb::ClaimResponse>, tonic::Status>| {
        r.expect("a gateway may claim").into_inner().won
    };
    assert!(won(gateway.claim(claim("replay/slack/Ev1", 60)).await));
    assert!(!won(gateway.claim(claim("replay/slack/Ev1", 60)).await));
    assert!(won(gateway.claim(claim("replay/slack/Ev2", 60)).await));
    for (req, says) in [
        (claim("", 60), "claim key is empty"),
        (claim(&"k".repeat(257), 60), "257 bytes long"),
        (claim("a\nb", 60), "control character"),
        (claim("replay/slack/Ev3", 0), "ttl_secs 0"),
        (claim("replay/slack/Ev3", 8 * 86_400), "ttl_secs 691200"),
    ] {
        let err = gateway.claim(req).await.expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(says), "{err:?}");
    }
    let agent = fleetcmd_proto::channel::connect(&fleet.url, &fleet.agent_tls("dev-1"))
        .await
        .expect("agent channel");
    for (who, channel, code) in [
        ("agent", agent, Code::PermissionDenied),
        ("operator", fleet.operator().await, Code::PermissionDenied),
        ("anonymous", fleet.anonymous().await, Code::Unauthenticated),
    ] {
        let err = ClaimsClient::new(channel)
            .claim(claim("replay/slack/Ev9", 60))
            .await
            .expect_err(who);
        assert_eq!(err.code(), code, "{who}: {err:?}");
    }
    // Nobody else took Ev9: the refused callers claimed nothing.
    assert!(won(gateway.claim(claim("replay/slack/Ev9", 60)).await));
}

// ------------------------------------------------- connection chats (IRC)

/// The chat lease of the IRC, XMPP and Matrix tests: short, so a takeover
/// after a crash is quick to see, and long enough that a clean handover (a
/// release, then the standby's next attempt within `ttl/3`) is told apart
/// from one after the lease ran out (at least `2*ttl/3` after the kill).
const CHAT_LEASE_SECS: u64 = 9;

/// A gateway.toml for `fleet` with the same `[irc]` section on every
/// gateway (one nick on one server), its state in `state`.
fn irc_gateway_config(fleet: &TestFleet, irc_port: u16, state: &Path, name: &str) -> PathBuf {
    let text = format!(
        r##"{head}chat_lease = "{CHAT_LEASE_SECS}s"

[irc]
server = "127.0.0.1"
port = {irc_port}
tls = false
nick = "fleetcmd"
network = "{network}"
channels = ["#ops"]
interval_ms = 50
burst = 20
"##,
        head = crate::gateway_restart::gateway_toml_head(fleet, state),
        network = crate::ngircd::NETWORK,
    );
    let path = fleet.path().join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("gateway.toml written");
    path
}

/// The dev policy, with IRC users of the test network as admins.
async fn push_irc_policy(fleet: &mut TestFleet) {
    push_policy_for(fleet, &format!("irc:{}:*", crate::ngircd::NETWORK)).await;
}

/// alice on IRC, in `#ops` (NAMES read).
async fn alice_in_ops(port: u16) -> IrcUser {
    let mut alice = IrcUser::connect(port, "alice").await;
    alice.send("JOIN #ops\r\n").await;
    alice.until(|l| l.split(' ').nth(1) == Some("366")).await;
    alice
}

/// Waits until the bot (nick `fleetcmd`) has joined `#ops`.
async fn bot_joined(alice: &mut IrcUser) {
    alice
        .until(|l| l.starts_with(":fleetcmd!") && l.contains(" JOIN "))
        .await;
}

/// alice says `!run echo WORD on all` and waits for the bot's reply with
/// the output; every line the channel saw meanwhile.
async fn run_echo(alice: &mut IrcUser, word: &str) -> Vec<String> {
    alice
        .send(&format!("PRIVMSG #ops :!run echo {word} on all\r\n"))
        .await;
    alice
        .until(|l| l.starts_with(":fleetcmd!") && l.contains(" PRIVMSG #ops :") && l.contains(word))
        .await
}

/// Which of two gateways started together holds `chat` (`irc`, `xmpp`,
/// `matrix`): the one that logged "holding the chat"; the other must not
/// have.
async fn the_holder(gateways: [&Gateway; 2], chat: &str) -> usize {
    let holding = format!("chat {chat}: holding the chat");
    let holders = wait_for("a holder", gateways, || async {
        let holders: Vec<usize> = (0..2)
            .filter(|i| gateways[*i].stderr().contains(&holding))
            .collect();
        (!holders.is_empty()).then_some(holders)
    })
    .await;
    assert_eq!(holders.len(), 1, "one holder: {holders:?}");
    holders[0]
}

/// alice's jobs on IRC (her identity is `irc:NETWORK:alice!…`).
async fn irc_jobs(fleet: &TestFleet) -> Vec<pb::Job> {
    let me = format!("irc:{}:alice", crate::ngircd::NETWORK);
    jobs_of(fleet, "")
        .await
        .into_iter()
        .filter(|j| j.requester.starts_with(&me))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_on_one_irc_channel_run_a_command_once_and_hand_over() {
    let mut fleet = start_fleet(1).await;
    push_irc_policy(&mut fleet).await;
    let ngircd = crate::ngircd::Ngircd::start(None).await;
    let mut alice = alice_in_ops(ngircd.port).await;
    let configs: Vec<PathBuf> = ["irc-a", "irc-b"]
        .iter()
        .map(|n| irc_gateway_config(&fleet, ngircd.port, &fleet.path().join(n), n))
        .collect();
    // Both start at once: one holds the chat and connects, the other
    // stands by, naming the holder.
    let mut gws: Vec<Option<Gateway>> = configs
        .iter()
        .map(|c| Some(Gateway::start(c, "nobody")))
        .collect();
    bot_joined(&mut alice).await;
    let first = {
        let [Some(a), Some(b)] = [&gws[0], &gws[1]] else {
            unreachable!("both started")
        };
        let first = the_holder([a, b], "irc").await;
        [a, b][1 - first]
            .logged("chat irc: standing by: held by", 1)
            .await;
        first
    };
    // One command, one job, one reply, from the one bot.
    let seen = run_echo(&mut alice, "lease-one").await;
    // A second command, answered after the first: had a second bot been
    // connected, its job for the first would be in by now.
    let seen2 = run_echo(&mut alice, "lease-two").await;
    let jobs = irc_jobs(&fleet).await;
    assert_eq!(jobs.len(), 2, "one job per command: {jobs:#?}");
    let from_bots: Vec<&String> = seen
        .iter()
        .chain(&seen2)
        .filter(|l| l.contains(" PRIVMSG #ops :") && !l.starts_with(":alice!"))
        .collect();
    assert!(
        from_bots.iter().all(|l| l.starts_with(":fleetcmd!")),
        "only the holder speaks: {from_bots:#?}"
    );
    let replies = from_bots
        .iter()
        .filter(|l| l.contains("lease-one") && l.contains("job "))
        .count();
    assert!(
        replies <= 1,
        "one reply to the first command: {from_bots:#?}"
    );

    // kill -9 the holder: the standby connects once the lease runs out.
    let killed = Instant::now();
    gws[first].take().expect("holder").kill9();
    bot_joined(&mut alice).await;
    let took = killed.elapsed();
    let bound = Duration::from_secs(CHAT_LEASE_SECS * 4 / 3 + 5);
    eprintln!("irc: the standby answered {took:?} after kill -9 of the holder");
    assert!(
        took < bound,
        "standby took over after {took:?} (bound {bound:?})"
    );
    let second = 1 - first;
    run_echo(&mut alice, "lease-three").await;
    assert_eq!(
        irc_jobs(&fleet).await.len(),
        3,
        "the third command ran once"
    );

    // The killed one comes back as the standby; a clean stop (SIGTERM) of
    // the holder releases the lease and it takes over at once.
    gws[first] = Some(Gateway::start(&configs[first], "nobody"));
    gws[first]
        .as_ref()
        .expect("restarted")
        .logged("chat irc: standing by: held by", 1)
        .await;
    let holder = gws[second].as_ref().expect("holder");
    let stopped = Instant::now();
    sigterm(holder);
    alice
        .until(|l| l.starts_with(":fleetcmd!") && l.contains(" QUIT "))
        .await;
    bot_joined(&mut alice).await;
    let took = stopped.elapsed();
    eprintln!("irc: the standby answered {took:?} after SIGTERM of the holder");
    // Released: the standby's next attempt (within ttl/3) takes it; had
    // it run out instead, that would be at least 2*ttl/3 after the stop,
    // which is the bound (the margin is for a loaded machine).
    let bound = Duration::from_secs(CHAT_LEASE_SECS * 2 / 3);
    assert!(
        took < bound,
        "handover after a clean stop took {took:?} (bound {bound:?}); old holder:\n{}",
        holder.stderr()
    );
    assert!(
        holder.stderr().contains("chat irc: lease released"),
        "{}",
        holder.stderr()
    );
    run_echo(&mut alice, "lease-four").await;
    assert_eq!(
        irc_jobs(&fleet).await.len(),
        4,
        "the fourth command ran once"
    );
}

// ------------------------------------------------ connection chats (XMPP)

/// alice's identity on the test prosody.
const XMPP_ALICE: &str = "xmpp:alice@localhost";

/// A gateway.toml for `fleet` with the same `[xmpp]` section on every
/// gateway (one JID with one resource, one nick, one room on `prosody`),
/// its state in `state`.
fn xmpp_gateway_config(fleet: &TestFleet, prosody: &Prosody, state: &Path, name: &str) -> PathBuf {
    let text = format!(
        r#"{head}chat_lease = "{CHAT_LEASE_SECS}s"

[xmpp]
jid = "{BOT}"
password = "{PASSWORD}"
host = "127.0.0.1"
port = {port}
ca_file = "{ca}"
rooms = ["{OPS}"]
nick = "{NICK}"
keepalive_secs = 5
"#,
        head = crate::gateway_restart::gateway_toml_head(fleet, state),
        port = prosody.port,
        ca = prosody.ca().display(),
    );
    let path = fleet.path().join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("gateway.toml written");
    // It holds the XMPP password inline: private, as the gateway requires.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod gateway.toml");
    }
    path
}

/// alice in the room, before any bot (she creates it).
async fn alice_in_room(prosody: &Prosody) -> User {
    let mut alice = User::login(prosody, "alice").await;
    alice.join(OPS, "alice").await;
    alice
}

/// The bot's presence in the room under its nickname, or a variant of it
/// (`fleetcmd_`: what a second session of the account would get).
fn bot_presence(el: &Element) -> bool {
    el.name == "presence" && from_of(el).starts_with(&format!("{OPS}/{NICK}"))
}

/// Waits until the bot joins the room, under its own nickname.
async fn xmpp_bot_joined(alice: &mut User) {
    let el = alice
        .wait_within(WAIT, "the bot joining the room", |el| {
            bot_presence(el) && el.attr("type").is_none()
        })
        .await;
    assert_eq!(
        from_of(&el),
        format!("{OPS}/{NICK}"),
        "the bot joined under another nickname: {el:#?}"
    );
}

/// Waits until the bot's session leaves the room.
async fn xmpp_bot_left(alice: &mut User) {
    alice
        .wait_within(WAIT, "the bot leaving the room", |el| {
            bot_presence(el) && el.attr("type") == Some("unavailable")
        })
        .await;
}

/// alice says `!run echo WORD on all` in the room and waits for the
/// bot's result, which shows the output.
async fn xmpp_run_echo(alice: &mut User, word: &str) {
    alice.say(OPS, &format!("!run echo {word} on all")).await;
    alice
        .wait_within(WAIT, &format!("the bot's result of {word}"), |el| {
            bot_said_in(OPS, el).is_some_and(|b| b.contains(word))
        })
        .await;
}

/// The messages the bot posted anew in the room (one per job: the
/// results are XEP-0308 corrections of them).
fn bot_posts(alice: &User) -> usize {
    alice
        .seen
        .iter()
        .filter(|el| bot_said_in(OPS, el).is_some())
        .filter(|el| el.child("replace", NS_CORRECT).is_none())
        .count()
}

/// The bot's comings and goings in the room that alice saw.
fn bot_presences(alice: &User) -> usize {
    alice.seen.iter().filter(|el| bot_presence(el)).count()
}

/// What alice saw in the room, one line per message (a correction
/// marked) and per coming or going of the bot, for failure messages.
fn room_log(alice: &User) -> String {
    let line = |el: &Element| {
        let from = from_of(el);
        if bot_presence(el) {
            let what = el.attr("type").unwrap_or("joined");
            return Some(format!("{from}: {what}\n"));
        }
        let body = body_of(el).filter(|_| el.name == "message")?;
        let fix = if el.child("replace", NS_CORRECT).is_some() {
            " (correction)"
        } else {
            ""
        };
        Some(format!("{from}{fix}: {body}\n"))
    };
    alice.seen.iter().filter_map(line).collect()
}

/// Occupants other than alice and the bot that spoke or showed up in the
/// room (a second bot session would be one).
fn strangers(alice: &User) -> Vec<&Element> {
    let known = [format!("{OPS}/alice"), format!("{OPS}/{NICK}")];
    alice
        .seen
        .iter()
        .filter(|el| {
            let from = from_of(el);
            from.starts_with(&format!("{OPS}/")) && !known.iter().any(|k| k == from)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_on_one_xmpp_room_run_a_command_once_and_hand_over() {
    let mut fleet = start_fleet(1).await;
    push_policy_for(&mut fleet, XMPP_ALICE).await;
    let prosody = Prosody::start().await;
    let mut alice = alice_in_room(&prosody).await;
    let configs: Vec<PathBuf> = ["xmpp-a", "xmpp-b"]
        .iter()
        .map(|n| xmpp_gateway_config(&fleet, &prosody, &fleet.path().join(n), n))
        .collect();
    // Both start at once: one holds the chat and connects, the other
    // stands by, naming the holder.
    let mut gws: Vec<Option<Gateway>> = configs
        .iter()
        .map(|c| Some(Gateway::start(c, "nobody")))
        .collect();
    xmpp_bot_joined(&mut alice).await;
    let first = {
        let [Some(a), Some(b)] = [&gws[0], &gws[1]] else {
            unreachable!("both started")
        };
        let first = the_holder([a, b], "xmpp").await;
        [a, b][1 - first]
            .logged("chat xmpp: standing by: held by", 1)
            .await;
        first
    };
    // One command, one job, one reply, from the one bot.
    xmpp_run_echo(&mut alice, "lease-one").await;
    // A second command, answered after the first: had a second bot been
    // connected, its job for the first would be in by now.
    xmpp_run_echo(&mut alice, "lease-two").await;
    let jobs = jobs_of(&fleet, XMPP_ALICE).await;
    assert_eq!(jobs.len(), 2, "one job per command: {jobs:#?}");
    assert_eq!(
        bot_posts(&alice),
        2,
        "one reply per command:\n{}",
        room_log(&alice)
    );
    // The bot joined once and stayed: a second session of the account
    // (the same resource) would push it out, and come back when pushed
    // out itself.
    assert_eq!(bot_presences(&alice), 1, "{}", room_log(&alice));

    // kill -9 the holder: the room sees it go at once (its socket closes),
    // and the standby connects once the lease runs out.
    let killed = Instant::now();
    gws[first].take().expect("holder").kill9();
    xmpp_bot_left(&mut alice).await;
    let gone = killed.elapsed();
    xmpp_bot_joined(&mut alice).await;
    let took = killed.elapsed();
    let bound = Duration::from_secs(CHAT_LEASE_SECS * 4 / 3 + 5);
    eprintln!(
        "xmpp: the room saw the holder go {gone:?} and the standby join {took:?} after kill -9 of the holder"
    );
    assert!(
        took < bound,
        "standby took over after {took:?} (bound {bound:?})"
    );
    let second = 1 - first;
    xmpp_run_echo(&mut alice, "lease-three").await;
    assert_eq!(
        jobs_of(&fleet, XMPP_ALICE).await.len(),
        3,
        "the third command ran once"
    );

    // The killed one comes back as the standby; a clean stop (SIGTERM) of
    // the holder closes its session and releases the lease, and the
    // standby takes over at its next attempt.
    gws[first] = Some(Gateway::start(&configs[first], "nobody"));
    gws[first]
        .as_ref()
        .expect("restarted")
        .logged("chat xmpp: standing by: held by", 1)
        .await;
    let holder = gws[second].as_ref().expect("holder");
    let stopped = Instant::now();
    sigterm(holder);
    xmpp_bot_left(&mut alice).await;
    let gone = stopped.elapsed();
    xmpp_bot_joined(&mut alice).await;
    let took = stopped.elapsed();
    eprintln!(
        "xmpp: the room saw the holder go {gone:?} and the standby join {took:?} after SIGTERM of the holder"
    );
    // Released: the standby's next attempt (within ttl/3) takes it; had
    // it run out instead, that would be at least 2*ttl/3 after the stop,
    // which is the bound (the margin is for a loaded machine).
    let bound = Duration::from_secs(CHAT_LEASE_SECS * 2 / 3);
    assert!(
        took < bound,
        "handover after a clean stop took {took:?} (bound {bound:?}); old holder:\n{}",
        holder.stderr()
    );
    holder.logged("chat xmpp: lease released", 1).await;
    // The killed holder's connection dropped; the stopped one said
    // goodbye (closed its stream), so the server kept no session of it.
    let ended = wait_for(
        "the stopped holder's session ended",
        [holder, gws[first].as_ref().expect("the new holder")],
        || async {
            let ended = prosody.ended_sessions(&format!("{BOT}/{NICK}"));
            (ended.len() >= 2).then_some(ended)
        },
    )
    .await;
    assert_eq!(ended.len(), 2, "two sessions ended: {ended:?}");
    assert_eq!(
        ended[1], "",
        "the stopped holder closed its stream: {ended:?}"
    );
    xmpp_run_echo(&mut alice, "lease-four").await;
    assert_eq!(
        jobs_of(&fleet, XMPP_ALICE).await.len(),
        4,
        "the fourth command ran once"
    );
    assert_eq!(
        bot_posts(&alice),
        4,
        "one reply per command:\n{}",
        room_log(&alice)
    );
    // Joined, killed, joined, stopped, joined: nobody else's session.
    assert_eq!(bot_presences(&alice), 5, "{}", room_log(&alice));
    let strangers = strangers(&alice);
    assert!(
        strangers.is_empty(),
        "only alice and one bot: {strangers:#?}"
    );
}

// ---------------------------------------------- connection chats (Matrix)

/// alice's identity on the test Synapse.
const MATRIX_ALICE: &str = "matrix:@alice:localhost";
/// The room the bot serves, by alias (alice creates it as `ops`).
const MATRIX_OPS: &str = "#ops:localhost";
/// How often alice types `!whoami` while she waits for a bot to answer.
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// Longest the whole Matrix test may take once Synapse's venv is made
/// (about a minute on 2 cores; its waits are bounded one by one too).
const MATRIX_TEST_TIMEOUT: Duration = Duration::from_secs(240);

/// A gateway.toml for `fleet` with the same `[matrix]` section on every
/// gateway (one bot account on `hs`, one room), its state in `state`.
fn matrix_gateway_config(fleet: &TestFleet, hs: &Synapse, state: &Path, name: &str) -> PathBuf {
    let password = fleet.path().join("matrix-password");
    std::fs::write(&password, "pw-bot\n").expect("password written");
    // Readable by the gateway only, as it requires.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600))
            .expect("chmod matrix-password");
    }
    let text = format!(
        r#"{head}chat_lease = "{CHAT_LEASE_SECS}s"

[matrix]
homeserver = "{url}"
user_id = "{bot}"
password_file = "{password}"
rooms = ["{MATRIX_OPS}"]
"#,
        head = crate::gateway_restart::gateway_toml_head(fleet, state),
        url = hs.url,
        bot = Synapse::user_id("bot"),
        password = password.display(),
    );
    let path = fleet.path().join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("gateway.toml written");
    path
}

/// Registers the bot and alice; alice creates the room with the bot
/// invited (each gateway's connection joins it). alice and the room's id.
async fn alice_in_matrix_room(hs: &Synapse) -> (synapse::User, String) {
    synapse::User::spawn(hs)
        .await
        .register(&["bot", "alice"])
        .await;
    let mut alice = synapse::User::login(hs, "alice").await;
    let room = alice
        .create_room("ops", false, &[Synapse::user_id("bot")])
        .await;
    (alice, room)
}

/// The bot's answers to `!whoami` that alice saw.
async fn whoami_answers(alice: &mut synapse::User, room: &str) -> usize {
    let said = alice.everything_bot_said(room).await;
    said.iter()
        .filter(|e| text_of(e).starts_with("you are "))
        .count()
}

/// alice types `!whoami` every [`PROBE_EVERY`] until a bot answers one:
/// how long after `since` the first answer came, and how many she typed.
/// A bot reads the room from where it was when it connected, so this is
/// when a connected bot is listening.
async fn first_answer(
    alice: &mut synapse::User,
    room: &str,
    since: Instant,
    gateways: &[&Gateway],
) -> (Duration, usize) {
    let before = whoami_answers(alice, room).await;
    let mut typed = 0;
    loop {
        alice.say(room, "!whoami").await;
        typed += 1;
        let next = Instant::now() + PROBE_EVERY;
        while Instant::now() < next {
            if whoami_answers(alice, room).await > before {
                return (since.elapsed(), typed);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let logs: Vec<String> = gateways.iter().map(|g| g.stderr()).collect();
        assert!(
            since.elapsed() < WAIT,
            "no bot answered `!whoami` within {WAIT:?}; gateways:\n{}",
            logs.join("\n-----\n")
        );
    }
}

/// alice says `!run echo WORD on all` and waits for the bot's message
/// that shows it.
async fn matrix_run_echo(alice: &mut synapse::User, room: &str, word: &str) {
    alice.say(room, &format!("!run echo {word} on all")).await;
    alice.bot_said(room, word).await;
}

/// The messages the bot posted anew in the room about jobs (one per job:
/// the progress and the result are `m.replace` edits of it; the answers
/// to `!whoami` left out).
async fn matrix_job_posts(alice: &mut synapse::User, room: &str) -> Vec<String> {
    let said = alice.everything_bot_said(room).await;
    said.iter()
        .filter(|e| e["content"]["m.relates_to"]["rel_type"] != "m.replace")
        .map(text_of)
        .filter(|t| !t.starts_with("you are "))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_on_one_matrix_room_run_a_command_once_and_hand_over() {
    // Made once per target directory (pip, a minute or more): not the
    // test's time.
    tokio::task::spawn_blocking(crate::synapse::venv_python)
        .await
        .expect("venv");
    tokio::time::timeout(MATRIX_TEST_TIMEOUT, matrix_handover())
        .await
        .unwrap_or_else(|_| {
            panic!("the Matrix handover did not finish within {MATRIX_TEST_TIMEOUT:?}")
        });
}

/// The body of the Matrix test: the IRC and XMPP tests' steps, with a bot
/// that stays a member of the room throughout (its account's membership is
/// the homeserver's, not a connection's), so alice sees a takeover only by
/// being answered.
async fn matrix_handover() {
    let mut fleet = start_fleet(1).await;
    push_policy_for(&mut fleet, MATRIX_ALICE).await;
    let hs = Synapse::start().await;
    let (mut alice, room) = alice_in_matrix_room(&hs).await;
    let configs: Vec<PathBuf> = ["matrix-a", "matrix-b"]
        .iter()
        .map(|n| matrix_gateway_config(&fleet, &hs, &fleet.path().join(n), n))
        .collect();
    // Both start at once: one holds the chat and connects, the other
    // stands by, naming the holder.
    let started = Instant::now();
    let mut probes = 0;
    let mut gws: Vec<Option<Gateway>> = configs
        .iter()
        .map(|c| Some(Gateway::start(c, "nobody")))
        .collect();
    let first = {
        let [Some(a), Some(b)] = [&gws[0], &gws[1]] else {
            unreachable!("both started")
        };
        let first = the_holder([a, b], "matrix").await;
        [a, b][1 - first]
            .logged("chat matrix: standing by: held by", 1)
            .await;
        let (took, typed) = first_answer(&mut alice, &room, started, &[a, b]).await;
        eprintln!(
            "matrix: the holder answered {took:?} after both gateways started ({typed} `!whoami` typed meanwhile)"
        );
        probes += typed;
        first
    };
    // One command, one job, one reply, from the one bot.
    matrix_run_echo(&mut alice, &room, "lease-one").await;
    // A second command, answered after the first: had a second bot been
    // connected, its job for the first would be in by now.
    matrix_run_echo(&mut alice, &room, "lease-two").await;
    let jobs = jobs_of(&fleet, MATRIX_ALICE).await;
    assert_eq!(jobs.len(), 2, "one job per command: {jobs:#?}");
    let posts = matrix_job_posts(&mut alice, &room).await;
    assert_eq!(posts.len(), 2, "one reply per command: {posts:#?}");

    // kill -9 the holder: the standby connects once the lease runs out,
    // and reads the room from there (what the killed one read before is
    // history to it).
    let killed = Instant::now();
    gws[first].take().expect("holder").kill9();
    let second = 1 - first;
    let standby = gws[second].as_ref().expect("standby");
    let (took, typed) = first_answer(&mut alice, &room, killed, &[standby]).await;
    probes += typed;
    eprintln!(
        "matrix: the standby answered {took:?} after kill -9 of the holder ({typed} `!whoami` typed meanwhile)"
    );
    let bound = Duration::from_secs(CHAT_LEASE_SECS * 4 / 3 + 5);
    assert!(
        took < bound,
        "standby took over after {took:?} (bound {bound:?}):\n{}",
        standby.stderr()
    );
    standby.logged("chat matrix: holding the chat", 1).await;
    matrix_run_echo(&mut alice, &room, "lease-three").await;
    let jobs = jobs_of(&fleet, MATRIX_ALICE).await;
    assert_eq!(
        jobs.len(),
        3,
        "the third command ran once, the first two not again: {jobs:#?}"
    );

    // The killed one comes back as the standby; a clean stop (SIGTERM) of
    // the holder releases the lease, and the standby takes over at its
    // next attempt.
    gws[first] = Some(Gateway::start(&configs[first], "nobody"));
    let restarted = gws[first].as_ref().expect("restarted");
    restarted
        .logged("chat matrix: standing by: held by", 1)
        .await;
    let holder = gws[second].as_ref().expect("holder");
    let stopped = Instant::now();
    sigterm(holder);
    // Released after disconnecting: whoever answers from here on is the
    // other gateway.
    holder.logged("chat matrix: lease released", 1).await;
    let (took, typed) = first_answer(&mut alice, &room, stopped, &[holder, restarted]).await;
    probes += typed;
    eprintln!(
        "matrix: the standby answered {took:?} after SIGTERM of the holder ({typed} `!whoami` typed meanwhile)"
    );
    // Released: the standby's next attempt (within ttl/3) takes it; had
    // it run out instead, that would be at least 2*ttl/3 after the stop,
    // which is the bound (the margin is for a loaded machine).
    let bound = Duration::from_secs(CHAT_LEASE_SECS * 2 / 3);
    assert!(
        took < bound,
        "handover after a clean stop took {took:?} (bound {bound:?}); old holder:\n{}\nnew holder:\n{}",
        holder.stderr(),
        restarted.stderr()
    );
    restarted.logged("chat matrix: holding the chat", 1).await;
    matrix_run_echo(&mut alice, &room, "lease-four").await;
    let jobs = jobs_of(&fleet, MATRIX_ALICE).await;
    assert_eq!(jobs.len(), 4, "the fourth command ran once: {jobs:#?}");
    let posts = matrix_job_posts(&mut alice, &room).await;
    assert_eq!(posts.len(), 4, "one reply per command: {posts:#?}");
    // A bot reads the room from where it was when it connected: what was
    // typed while none was listening is never answered.
    let answered = whoami_answers(&mut alice, &room).await;
    eprintln!("matrix: {answered} of {probes} `!whoami` answered");
    assert!(answered <= probes, "one answer per `!whoami` at most");
}

/// Stops `gw` cleanly, as systemd does.
fn sigterm(gw: &Gateway) {
    let term = std::process::Command::new("kill")
        .args(["-TERM", &gw.pid().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(term.success());
}

/// A `Claims.Hold` request.
fn hold_req(name: &str, holder: &str, term: u64, release: bool) -> pb::HoldRequest {
    pb::HoldRequest {
        name: name.into(),
        holder: holder.into(),
        term,
        ttl_secs: 30,
        release,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_certificate_cannot_touch_a_controller_lease_or_another_gateways() {
    let fleet = start_fleet(0).await;
    let store = fleet.fleet.controller.shared().store.clone();
    let health = {
        let store = store.clone();
        assert_eventually(WAIT, move || {
            let store = store.clone();
            async move { store.lease_holder("health").ok().flatten() }
        })
        .await
    };
    let mut gw = pb::claims_client::ClaimsClient::new(fleet.gateway().await);
    // Renew and release `health` as its holder, at its term and around it:
    // never held (they name `gateway/health`, which nobody holds).
    for term in [health.term, health.term + 1, 1] {
        for release in [false, true] {
            let got = gw
                .hold(hold_req("health", &health.holder, term, release))
                .await
                .expect("answered")
                .into_inner();
            assert!(!got.held, "term {term} release {release}: {got:?}");
        }
    }
    // Taking `health` takes `gateway/health`; the controller keeps its own.
    let got = gw
        .hold(hold_req("health", "gw-a", 0, false))
        .await
        .expect("answered")
        .into_inner();
    assert!(got.held);
    let now = store.lease_holder("health").expect("read").expect("held");
    assert_eq!(now.holder, health.holder);
    assert!(now.term >= health.term);
    // `gateway/…` names are prefixed again: no way into another prefix.
    let got = gw
        .hold(hold_req("gateway/irc/x", "gw-a", 0, false))
        .await
        .expect("answered")
        .into_inner();
    assert!(got.held);
    assert!(
        store
            .lease_holder("gateway/gateway/irc/x")
            .expect("read")
            .is_some_and(|l| l.holder == "dev:gw-a")
    );
    // Another gateway's running lease: not taken, not renewed, not
    // released; the answer names the holder.
    let mine = gw
        .hold(hold_req("irc/chat", "gw-a", 0, false))
        .await
        .expect("answered")
        .into_inner();
    assert!(mine.held && mine.term > 0);
    let theirs = gw
        .hold(hold_req("irc/chat", "gw-b", 0, false))
        .await
        .expect("answered")
        .into_inner();
    assert_eq!((theirs.held, theirs.holder.as_str()), (false, "dev:gw-a"));
    for release in [false, true] {
        let got = gw
            .hold(hold_req("irc/chat", "gw-b", mine.term, release))
            .await
            .expect("answered")
            .into_inner();
        assert!(!got.held, "release {release}: {got:?}");
    }
    let still = store
        .lease_holder("gateway/irc/chat")
        .expect("read")
        .expect("held");
    assert_eq!((still.holder.as_str(), still.term), ("dev:gw-a", mine.term));
    // Another gateway certificate, told the holder id, cannot take, extend
    // or release it either (found by an outside test: it renewed and
    // released the chat's lease, then held it and kept every gateway off
    // the chat).
    let evil = fleet
        .fleet
        .controller
        .shared()
        .ca
        .issue_identity(fleetcmd_controller::pki::Role::Gateway, "evil", WAIT)
        .expect("issued");
    let evil = fleetcmd_proto::channel::connect(
        &fleet.url,
        &fleetcmd_proto::channel::ClientTls {
            ca_pem: fleet.gateway_tls.ca_pem.clone(),
            cert_pem: evil.cert_pem,
            key_pem: evil.key_pem.expose().clone(),
        },
    )
    .await
    .expect("evil connects");
    let mut evil = pb::claims_client::ClaimsClient::new(evil);
    for (holder, term, release) in [
        ("gw-a", 0, false),
        ("dev:gw-a", 0, false),
        ("gw-a", mine.term, false),
        ("gw-a", mine.term, true),
        ("dev:gw-a", mine.term, true),
    ] {
        let got = evil
            .hold(hold_req("irc/chat", holder, term, release))
            .await
            .expect("answered")
            .into_inner();
        assert!(!got.held, "{holder} {term} {release}: {got:?}");
    }
    let still = store
        .lease_holder("gateway/irc/chat")
        .expect("read")
        .expect("held");
    assert_eq!((still.holder.as_str(), still.term), ("dev:gw-a", mine.term));
    // Bad requests are refused, saying what was wrong.
    for (req, says) in [
        (
            hold_req("irc/chat", "gw a", 0, false),
            "lease holder has a non-printable byte at 2",
        ),
        (
            hold_req("", "gw-a", 0, false),
            "lease name: claim key is empty",
        ),
        (
            hold_req("irc/chat", "gw-a", 0, true),
            "lease release needs the term",
        ),
        (
            pb::HoldRequest {
                ttl_secs: 3600,
                ..hold_req("irc/chat", "gw-a", 0, false)
            },
            "lease ttl_secs 3600 is outside 5 to 300",
        ),
    ] {
        let e = gw.hold(req).await.expect_err("refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains(says), "{}", e.message());
    }
    // Operators and agents may not hold anything.
    let e = pb::claims_client::ClaimsClient::new(fleet.operator().await)
        .hold(hold_req("irc/chat", "op", 0, false))
        .await
        .expect_err("operator refused");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
}
