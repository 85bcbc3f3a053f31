//! The Matrix adapter against a REAL Synapse (see `synapse.rs`), started
//! by each test on a free loopback port. The humans are matrix-nio clients
//! (`tests/it/matrix/user.py`, driven line by line over stdin/stdout); the
//! bot runs the whole gateway loop (`serve`) against the fake controller
//! (two agents answering `up 3 days, load 0.5`) with a policy that binds
//! `matrix:@alice:localhost` and `matrix:@carol:localhost` to `oncall`.

use std::sync::Arc;
use std::time::Duration;

use fleetcmd_gateway::adapters::matrix::rooms::E2EE_REFUSAL;
use fleetcmd_gateway::adapters::matrix::{MatrixAdapter, MatrixConfig};
use fleetcmd_gateway::router::Router;
use fleetcmd_gateway::serve;
use serde_json::json;

use crate::support::{FakeController, router_with_extra};
use crate::synapse::{Synapse, User, text_of};
use crate::xmpp::submitted;

/// Every test finishes well within this (Synapse's start included; about
/// 10 to 25 s each on 2 cores).
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

const BINDINGS: &str = r#"
[[bindings]]
subjects = ["matrix:@alice:localhost", "matrix:@carol:localhost"]
roles = ["oncall"]
"#;

/// Runs `f` within [`TEST_TIMEOUT`], after the venv is there (its first
/// install takes a minute or more and is not the test's).
async fn within<F: std::future::Future<Output = ()>>(f: F) {
    tokio::task::spawn_blocking(crate::synapse::venv_python)
        .await
        .expect("venv");
    if tokio::time::timeout(TEST_TIMEOUT, f).await.is_err() {
        panic!("test did not finish within {TEST_TIMEOUT:?}");
    }
}

/// Registers the bot and the humans, logs alice in, and has her create
/// `#ops` (and `#secret`, end-to-end encrypted) with the bot and the
/// others invited.
async fn world(hs: &Synapse, with_secret: bool) -> (User, String, Option<String>) {
    let mut alice = User::spawn(hs).await;
    alice.register(&["bot", "alice", "bob", "carol"]).await;
    let mut alice = User::login(hs, "alice").await;
    let invite: Vec<String> = ["bot", "bob", "carol"]
        .iter()
        .map(|n| Synapse::user_id(n))
        .collect();
    let ops = alice.create_room("ops", false, &invite).await;
    let secret = if with_secret {
        Some(alice.create_room("secret", true, &invite).await)
    } else {
        None
    };
    (alice, ops, secret)
}

/// The bot's config: password login, the given rooms.
fn bot_config(hs: &Synapse, rooms: &[&str]) -> MatrixConfig {
    let pw = hs.dir.path().join("bot-password");
    crate::support::write_private(&pw, "pw-bot\n");
    let mut cfg = MatrixConfig::new(&hs.url, &Synapse::user_id("bot"), &pw);
    cfg.rooms = rooms.iter().map(|r| r.to_string()).collect();
    cfg.sync_timeout_secs = 5;
    cfg
}

async fn start_bot(
    hs: &Synapse,
    rooms: &[&str],
) -> (Arc<Router<FakeController>>, tokio::task::JoinHandle<()>) {
    let router = router_with_extra(BINDINGS, |_| {});
    let adapter = MatrixAdapter::connect(&bot_config(hs, rooms))
        .await
        .unwrap_or_else(|e| panic!("bot connect: {e}\n{}", hs.logs()));
    (router.clone(), tokio::spawn(serve(router, adapter)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_command_is_answered_edited_in_place_approved_by_reaction_and_refused_without_a_role()
 {
    within(async {
        let hs = Synapse::start().await;
        let (mut alice, ops, _) = world(&hs, false).await;
        let (router, gw) = start_bot(&hs, &["#ops:localhost"]).await;

        // The identity is the homeserver's user id, never a display name.
        alice.say(&ops, "!whoami").await;
        let who = alice.bot_said(&ops, "you are").await;
        assert_eq!(
            text_of(&who),
            "you are matrix:@alice:localhost\n  roles: oncall"
        );
        assert_eq!(who["content"]["msgtype"], "m.notice");

        // A job: acknowledged, then that message edited (m.replace) to the result.
        alice.say(&ops, "!run uptime on all").await;
        let posted = alice.bot_said(&ops, "2 targets").await;
        let posted_id = posted["event_id"].as_str().unwrap_or_default().to_string();
        let done = alice.bot_said(&ops, "succeeded").await;
        assert_eq!(
            done["content"]["m.relates_to"],
            json!({"rel_type": "m.replace", "event_id": posted_id}),
            "the result edits the job's message: {done}"
        );
        let text = text_of(&done);
        assert!(
            text.contains("succeeded (2/2 ok) — asked by matrix:@alice:localhost"),
            "{text}"
        );
        assert!(text.contains("\n    | up 3 days, load 0.5"), "{text}");
        let html = done["content"]["m.new_content"]["formatted_body"]
            .as_str()
            .unwrap_or_default();
        assert!(html.contains("<pre><code>"), "{html}");

        let jobs = submitted(&router);
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].requester.as_str(), "matrix:@alice:localhost");
        assert_eq!(jobs[0].channel, format!("matrix:{ops}"));

        // bob has no role: refused, nothing submitted.
        let mut bob = User::login(&hs, "bob").await;
        bob.join(&ops).await;
        bob.say(&ops, "!run uptime on all").await;
        let refused = bob.bot_said(&ops, "no roles").await;
        assert!(
            text_of(&refused).starts_with("refused: you have no roles; nothing was submitted"),
            "{refused}"
        );
        assert_eq!(submitted(&router).len(), 1);

        // The bot's own account typing a command (another device) is ignored.
        let mut itself = User::login(&hs, "bot").await;
        itself.say(&ops, "!run uptime on all").await;

        // An approval by reaction: alice asks, carol reacts ✅.
        let mut carol = User::login(&hs, "carol").await;
        carol.join(&ops).await;
        alice.say(&ops, "!run reboot on all").await;
        let request = alice.bot_said(&ops, "needs 1 approval").await;
        assert!(
            text_of(&request).contains("react ✅ to approve"),
            "{request}"
        );
        let request_id = request["event_id"].as_str().unwrap_or_default().to_string();
        carol.react(&ops, &request_id, "✅").await;
        alice
            .bot_said(&ops, "approved by matrix:@carol:localhost")
            .await;
        let jobs = submitted(&router);
        assert_eq!(
            jobs.iter().map(|j| j.command.as_str()).collect::<Vec<_>>(),
            ["uptime", "reboot"],
            "the bot's own command ran nothing; the approved reboot ran"
        );
        assert_eq!(jobs[1].requester.as_str(), "matrix:@alice:localhost");
        assert!(
            alice
                .everything_bot_said(&ops)
                .await
                .iter()
                .all(|e| !text_of(e).contains("asked by matrix:@bot:localhost")),
            "the bot never answered itself"
        );
        gw.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_room_is_refused_once_and_never_answered() {
    within(async {
        let hs = Synapse::start().await;
        let (mut alice, ops, secret) = world(&hs, true).await;
        let secret = secret.expect("secret room");
        let (router, gw) = start_bot(&hs, &["#ops:localhost", "#secret:localhost"]).await;

        let refusal = alice.bot_said(&secret, "end-to-end encrypted").await;
        assert_eq!(text_of(&refusal), E2EE_REFUSAL);
        // A plaintext command in the encrypted room (nio without libolm
        // sends it in the clear) is not acted on.
        alice.say(&secret, "!run uptime on all").await;
        alice.say(&secret, "fleetcmd: whoami").await;
        // The bot reads rooms in order within one /sync: an answer in #ops
        // to a later message means it has read those.
        alice.say(&ops, "!whoami").await;
        alice
            .bot_said(&ops, "you are matrix:@alice:localhost")
            .await;
        let said = alice.everything_bot_said(&secret).await;
        assert_eq!(said.len(), 1, "one refusal, no answers: {said:?}");
        assert!(submitted(&router).is_empty());
        gw.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_or_unknown_room_fails_the_start_naming_it() {
    within(async {
        let hs = Synapse::start().await;
        let (_alice, _ops, _) = world(&hs, false).await;
        let tok = hs.dir.path().join("bad-token");
        crate::support::write_private(&tok, "syt_not_a_token\n");
        let mut cfg = bot_config(&hs, &["#ops:localhost"]);
        cfg.password_file = None;
        cfg.access_token_file = Some(tok);
        let e = MatrixAdapter::connect(&cfg)
            .await
            .err()
            .expect("refused")
            .to_string();
        assert!(
            e.contains("M_UNKNOWN_TOKEN") && e.contains("access_token_file"),
            "{e}"
        );
        let e = MatrixAdapter::connect(&bot_config(&hs, &["#nowhere:localhost"]))
            .await
            .err()
            .expect("unknown alias")
            .to_string();
        assert!(
            e.contains("#nowhere:localhost") && e.contains("M_NOT_FOUND"),
            "{e}"
        );
    })
    .await;
}
