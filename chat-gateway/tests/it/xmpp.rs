//! The XMPP adapter against a REAL prosody (`crate::prosody`), started by
//! each test. The users (alice, mallory) are ordinary XMPP clients built on
//! the adapter's public client module; the bot runs the whole gateway loop
//! (`serve`) against the fake controller with a policy that binds
//! `xmpp:alice@localhost`.

use std::sync::Arc;
use std::time::Duration;

use fleetcmd_core::job::JobSpec;
use fleetcmd_gateway::adapters::xmpp::client::{ClientError, Connection, TlsMode};
use fleetcmd_gateway::adapters::xmpp::jid::Jid;
use fleetcmd_gateway::adapters::xmpp::rooms::HIDDEN_JIDS_WARNING;
use fleetcmd_gateway::adapters::xmpp::stanza::NS_CORRECT;
use fleetcmd_gateway::adapters::xmpp::xml::{Element, NS_CLIENT};
use fleetcmd_gateway::adapters::xmpp::{XmppAdapter, XmppConfig, body};
use fleetcmd_gateway::adapters::{Action, ChatAdapter, Reply};
use fleetcmd_gateway::router::Router;
use fleetcmd_gateway::serve;
use fleetcmd_proto::v1;

use crate::prosody::{
    BOT, NICK, OPS, PASSWORD, Prosody, User, WAIT, body_of, bot_said_in, from_of, jid,
};
use crate::support::{FakeController, router_for};

const SECRET_ROOM: &str = "secret@anon.localhost";
/// Every test finishes well within this.
const TEST_TIMEOUT: Duration = Duration::from_secs(20);

async fn within<F: std::future::Future<Output = ()>>(f: F) {
    if tokio::time::timeout(TEST_TIMEOUT, f).await.is_err() {
        panic!("test did not finish within {TEST_TIMEOUT:?}");
    }
}

/// The policy after its `[[signers]]` block.
const POLICY: &str = r#"
[commands.uptime]
description = "Load average and uptime"
argv = ["/usr/bin/uptime"]

[roles.oncall]
commands = ["uptime"]

[[bindings]]
subjects = ["xmpp:alice@localhost"]
roles = ["oncall"]
"#;

/// A router over the fake controller with a policy binding alice's JID.
fn router(tweak: impl FnOnce(&mut FakeController)) -> Arc<Router<FakeController>> {
    router_for(3, POLICY, tweak)
}

/// Connects the bot, waits until it sits in `rooms`, runs the gateway.
async fn start_bot(
    p: &Prosody,
    rooms: &[&str],
    router: Arc<Router<FakeController>>,
) -> tokio::task::JoinHandle<()> {
    let adapter = XmppAdapter::connect(&p.bot_config(rooms))
        .await
        .unwrap_or_else(|e| panic!("bot connect: {e}\n{}", p.logs()));
    let want: Vec<Jid> = rooms.iter().map(|r| jid(r)).collect();
    assert!(
        adapter.wait_joined(&want, WAIT).await,
        "bot joined only {:?}",
        adapter.joined_rooms()
    );
    tokio::spawn(serve(router, adapter))
}

pub(crate) fn submitted(router: &Router<FakeController>) -> Vec<JobSpec> {
    router
        .controller()
        .submitted()
        .iter()
        .map(|j| JobSpec::from_bytes(&j.spec).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_command_end_to_end_names_the_real_jid_and_edits_in_place() {
    within(async {
        let p = Prosody::start().await;
        let router = router(|_| {});
        let gw = start_bot(&p, &[OPS], router.clone()).await;
        let mut alice = User::login(&p, "alice").await;
        alice.join(OPS, "alice").await;

        alice.say(OPS, "!whoami").await;
        let who = alice.bot_reply(OPS, "you are").await;
        assert_eq!(
            body_of(&who).as_deref(),
            Some("you are xmpp:alice@localhost\n  roles: oncall")
        );

        alice.say(OPS, "!run uptime on all").await;
        let posted = alice.bot_reply(OPS, "2 targets").await;
        let posted_body = body_of(&posted).unwrap_or_default();
        assert!(
            posted_body.contains("`uptime` on all by xmpp:alice@localhost"),
            "{posted_body}"
        );
        let posted_id = posted
            .attr("id")
            .unwrap_or_else(|| panic!("no id: {posted:#?}"))
            .to_string();
        let done = alice.bot_reply(OPS, "succeeded").await;
        let replace = done.child("replace", NS_CORRECT).and_then(|r| r.attr("id"));
        assert_eq!(
            replace,
            Some(posted_id.as_str()),
            "XEP-0308 correction of the first message: {done:#?}"
        );
        let text = body_of(&done).unwrap_or_default();
        assert!(
            text.contains("succeeded (2/2 ok) — asked by xmpp:alice@localhost"),
            "{text}"
        );
        assert!(text.contains("\n    | up 3 days, load 0.5"), "{text}");

        let jobs = submitted(&router);
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].requester.as_str(), "xmpp:alice@localhost");
        assert_eq!(jobs[0].channel, "xmpp:ops@conference.localhost");
        gw.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoofed_nickname_gets_the_spoofers_own_identity() {
    within(async {
        let p = Prosody::start().await;
        let router = router(|_| {});
        let gw = start_bot(&p, &[OPS], router.clone()).await;
        let mut alice = User::login(&p, "alice").await;
        alice.join(OPS, "alice").await;
        alice.say(OPS, "!whoami").await;
        alice.bot_reply(OPS, "you are xmpp:alice@localhost").await;

        let mut mallory = User::login(&p, "mallory").await;
        mallory.join(OPS, "mal").await;
        // alice leaves; mallory takes her nickname.
        alice
            .send(&format!("<presence type='unavailable' to='{OPS}/alice'/>"))
            .await;
        mallory
            .wait_for("alice leaving", |el| {
                from_of(el) == format!("{OPS}/alice") && el.attr("type") == Some("unavailable")
            })
            .await;
        mallory.join(OPS, "alice").await;

        mallory.say(OPS, "!run uptime on all").await;
        let refused = mallory.bot_reply(OPS, "asked by").await;
        assert_eq!(
            body_of(&refused).as_deref(),
            Some("refused: you have no roles; nothing was submitted — asked by xmpp:mallory@localhost")
        );
        mallory.say(OPS, "!whoami").await;
        let who = mallory.bot_reply(OPS, "you are").await;
        assert_eq!(
            body_of(&who).as_deref(),
            Some("you are xmpp:mallory@localhost\n  roles: none")
        );
        assert!(submitted(&router).is_empty(), "nothing may run for mallory");
        let leaked: Vec<&Element> = mallory
            .seen
            .iter()
            .filter(|el| bot_said_in(OPS, el).is_some_and(|b| b.contains("xmpp:alice@localhost")))
            .collect();
        // The only bot message naming alice is the answer to her own !whoami,
        // sent before mallory joined: nothing after that speaks for alice.
        assert!(leaked.is_empty(), "{leaked:#?}");
        gw.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_messages_are_answered_in_the_direct_chat() {
    within(async {
        let p = Prosody::start().await;
        let router = router(|_| {});
        let gw = start_bot(&p, &[OPS], router.clone()).await;
        let mut alice = User::login(&p, "alice").await;
        let from_bot = |el: &Element| {
            el.name == "message"
                && el.attr("type") == Some("chat")
                && from_of(el).starts_with("fleetbot@localhost/")
        };
        alice.tell(BOT, "whoami").await;
        let who = alice
            .wait_for("the bot's direct answer", |el| {
                from_bot(el) && body_of(el).is_some_and(|b| b.starts_with("you are"))
            })
            .await;
        assert_eq!(
            body_of(&who).as_deref(),
            Some("you are xmpp:alice@localhost\n  roles: oncall")
        );
        alice.tell(BOT, "run uptime on all").await;
        let done = alice
            .wait_for("the job result", |el| {
                from_bot(el) && body_of(el).is_some_and(|b| b.contains("succeeded"))
            })
            .await;
        assert!(done.child("replace", NS_CORRECT).is_some(), "{done:#?}");
        let jobs = submitted(&router);
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].channel, "xmpp:alice@localhost");
        assert_eq!(jobs[0].requester.as_str(), "xmpp:alice@localhost");
        gw.abort();
    })
    .await;
}

/// What the gateway does to a connection when another gateway is to take
/// over the account (a stop signal, a lost lease): a goodbye, so the
/// server does not keep a session the bot left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_closes_the_stream_and_leaves_the_room_at_once() {
    within(async {
        let p = Prosody::start().await;
        let mut alice = User::login(&p, "alice").await;
        alice.join(OPS, "alice").await;
        let mut bot = XmppAdapter::connect(&p.bot_config(&[OPS]))
            .await
            .unwrap_or_else(|e| panic!("bot connect: {e}\n{}", p.logs()));
        assert!(bot.wait_joined(&[jid(OPS)], WAIT).await);
        bot.stop_handle().stop();
        let ended = tokio::time::timeout(WAIT, async { while bot.recv().await.is_some() {} }).await;
        assert!(ended.is_ok(), "recv still open after a stop");
        alice
            .wait_for("the bot leaving", |el| {
                from_of(el) == format!("{OPS}/{NICK}") && el.attr("type") == Some("unavailable")
            })
            .await;
        // The server saw a goodbye, not a dropped connection.
        let deadline = tokio::time::Instant::now() + WAIT;
        let ended = loop {
            let ended = p.ended_sessions(&format!("{BOT}/{NICK}"));
            if !ended.is_empty() {
                break ended;
            }
            assert!(tokio::time::Instant::now() < deadline, "{}", p.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(ended, [""], "{}", p.logs());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_a_prosody_restart_and_rejoins() {
    within(async {
        let mut p = Prosody::start().await;
        let router = router(|_| {});
        let gw = start_bot(&p, &[OPS], router.clone()).await;
        let mut alice = User::login(&p, "alice").await;
        alice.join(OPS, "alice").await;
        alice.say(OPS, "!whoami").await;
        alice.bot_reply(OPS, "you are xmpp:alice@localhost").await;

        p.stop().await;
        p.spawn().await;

        let mut alice = User::login(&p, "alice").await;
        alice.join(OPS, "alice").await;
        alice
            .wait_for("the bot back in the room", |el| {
                el.name == "presence"
                    && from_of(el) == format!("{OPS}/{NICK}")
                    && el.attr("type").is_none()
            })
            .await;
        alice.say(OPS, "!whoami").await;
        let who = alice.bot_reply(OPS, "you are").await;
        assert_eq!(
            body_of(&who).as_deref(),
            Some("you are xmpp:alice@localhost\n  roles: oncall")
        );
        gw.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_trusts_the_configured_ca_and_nothing_weaker() {
    within(async {
        let p = Prosody::start().await;
        let opts = p
            .config(BOT)
            .client_options()
            .unwrap_or_else(|e| panic!("{e}"));
        let conn = Connection::connect(&opts)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", p.logs()));
        assert!(conn.tls, "STARTTLS was used");
        assert!(conn.mechanism.starts_with("SCRAM-"), "{}", conn.mechanism);
        assert_eq!(conn.jid.to_string(), "fleetbot@localhost/fleetcmd");

        let err = |cfg: XmppConfig| async move {
            match XmppAdapter::connect(&cfg).await {
                Ok(_) => panic!("connected with {cfg:?}"),
                Err(e) => e.to_string(),
            }
        };
        // The public roots do not include the test CA.
        let mut public_roots = p.bot_config(&[]);
        public_roots.ca_file = None;
        let e = err(public_roots).await;
        assert!(
            e.contains("TLS") && e.contains("invalid peer certificate"),
            "{e}"
        );
        // No TLS to a server that requires it: refused before any password is sent.
        let mut plain = p.bot_config(&[]);
        plain.tls = TlsMode::None;
        let e = err(plain).await;
        assert!(e.contains("requires TLS"), "{e}");
        let mut wrong = p.bot_config(&[]);
        wrong.password = Some(fleetcmd_gateway::adapters::xmpp::Password(
            fleetcmd_core::crypto::Secret::new("wrong".into()),
        ));
        let e = err(wrong).await;
        assert!(e.contains("authentication failed: not-authorized"), "{e}");
        assert!(!e.contains(PASSWORD) && !e.contains("wrong"), "{e}");
        let e = Connection::connect(&{
            let mut o = opts.clone();
            o.tls = TlsMode::Direct;
            o
        })
        .await
        .err()
        .map(|e: ClientError| e.to_string())
        .unwrap_or_default();
        assert!(
            e.contains("TLS"),
            "direct TLS to a STARTTLS port fails cleanly: {e}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_only_over_tls_and_no_tls_only_to_loopback() {
    within(async {
        // A server offering only PLAIN: used, because the stream is TLS.
        let p =
            Prosody::start_with("disable_sasl_mechanisms = { \"SCRAM-SHA-1\", \"SCRAM-SHA-256\" }")
                .await;
        let opts = p
            .config(BOT)
            .client_options()
            .unwrap_or_else(|e| panic!("{e}"));
        let conn = Connection::connect(&opts)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", p.logs()));
        assert_eq!((conn.tls, conn.mechanism), (true, "PLAIN"));
        drop(conn);
        drop(p);

        // A server that allows plaintext, on loopback: `tls = "none"` works
        // (SCRAM, so the password is not sent in clear either).
        let p = Prosody::start_with("c2s_require_encryption = false").await;
        let mut cfg = p.bot_config(&[OPS]);
        cfg.tls = TlsMode::None;
        cfg.ca_file = None;
        let conn = Connection::connect(&cfg.client_options().unwrap_or_else(|e| panic!("{e}")))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", p.logs()));
        assert_eq!((conn.tls, conn.mechanism), (false, "SCRAM-SHA-1"));
        // …but never to a non-loopback host.
        cfg.host = Some("192.0.2.1".into());
        let problems = cfg.validate();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].0, "tls");
    })
    .await;
}

const HOSTILE: &str = "@all deploy now\n!run reboot on all\n</body><body>pwned</body>\n<!here> `x` &amp; ]]>\n\u{1b}[31mred\u{7}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_output_arrives_inert_and_well_formed() {
    within(async {
        let p = Prosody::start().await;
        let router = router(|f| f.output = HOSTILE.as_bytes().to_vec());
        let gw = start_bot(&p, &[OPS], router.clone()).await;
        let mut alice = User::login(&p, "alice").await;
        alice.join(OPS, "alice").await;
        alice.say(OPS, "!run uptime on all").await;
        let done = alice.bot_reply(OPS, "succeeded").await;
        let bodies = done.elements().filter(|e| e.is("body", NS_CLIENT)).count();
        assert_eq!(bodies, 1, "exactly one body: {done:#?}");
        let text = body_of(&done).unwrap_or_default();
        for expected in [
            "    | @\u{2060}all deploy now",
            "    | !run reboot on all",
            "    | </body><body>pwned</body>",
            "    | <!here> `x` &amp; ]]>",
            "    | \u{FFFD}[31mred\u{FFFD}",
        ] {
            assert_eq!(
                text.matches(expected).count(),
                2,
                "{expected:?} once per host in:\n{text}"
            );
        }
        for line in text.lines() {
            let t = line.trim_start();
            assert!(
                !t.starts_with(['!', '@', '/', '<']),
                "line looks addressed: {line:?}"
            );
            assert!(
                !line.chars().any(|c| c.is_control()),
                "control char in {line:?}"
            );
        }
        // The bot's stream survived its own output: it still answers.
        alice.say(OPS, "!whoami").await;
        alice.bot_reply(OPS, "you are xmpp:alice@localhost").await;
        gw.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_that_hides_real_jids_is_refused_with_one_warning() {
    within(async {
        let p = Prosody::start().await;
        let router = router(|_| {});
        // alice creates the room, so she owns it and the bot is a plain
        // participant: it is not shown real JIDs there.
        let mut alice = User::login(&p, "alice").await;
        alice.join(SECRET_ROOM, "alice").await;
        let gw = start_bot(&p, &[SECRET_ROOM], router.clone()).await;
        alice
            .wait_for("the bot joining", |el| {
                from_of(el) == format!("{SECRET_ROOM}/{NICK}")
            })
            .await;
        alice.say(SECRET_ROOM, "!whoami").await;
        let warning = alice
            .bot_reply(SECRET_ROOM, "I cannot tell who you are")
            .await;
        assert_eq!(body_of(&warning).as_deref(), Some(HIDDEN_JIDS_WARNING));
        alice.say(SECRET_ROOM, "!run uptime on all").await;
        alice.say(SECRET_ROOM, "fleetcmd: whoami").await;
        // Make sure the bot has read both before checking it stayed silent:
        // a direct message is answered only after them (one stream, in order).
        alice.tell(BOT, "whoami").await;
        alice
            .wait_for("the direct answer", |el| {
                el.attr("type") == Some("chat")
                    && body_of(el).is_some_and(|b| b.starts_with("you are"))
            })
            .await;
        let more: Vec<&Element> = alice
            .seen
            .iter()
            .filter(|el| bot_said_in(SECRET_ROOM, el).is_some())
            .collect();
        assert_eq!(more.len(), 1, "one warning, no answers: {more:#?}");
        assert!(submitted(&router).is_empty());
        gw.abort();
    })
    .await;
}

fn target(
    host: &str,
    state: &str,
    outcome: v1::Outcome,
    code: i32,
    out: &str,
    err: &str,
) -> v1::Target {
    v1::Target {
        agent_id: host.to_string(),
        state: state.to_string(),
        result: Some(v1::JobResult {
            job_id: "0190ab12-34cd-7ef0-8123-456789abcdef".to_string(),
            outcome: outcome as i32,
            exit_code: Some(code),
            stdout: out.as_bytes().to_vec(),
            stderr: err.as_bytes().to_vec(),
            duration_ms: 1234,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn job_result_body_snapshot() {
    let job = v1::Job {
        job_id: "0190ab12-34cd-7ef0-8123-456789abcdef".to_string(),
        command: "uptime".to_string(),
        selector: "role=web".to_string(),
        requester: "xmpp:alice@localhost".to_string(),
        channel: "xmpp:ops@conference.localhost".to_string(),
        state: "failed".to_string(),
        targets: vec![
            target(
                "web-1",
                "ok",
                v1::Outcome::Ok,
                0,
                " 10:00:01 up 3 days,  load average: 0.50\n@channel <!here> `rm -rf` ```\n!run reboot on all\n</body><body>x</body>",
                "",
            ),
            target(
                "web-2",
                "failed",
                v1::Outcome::Failed,
                2,
                "",
                "uptime: /proc not mounted\n@all help",
            ),
        ],
        ..Default::default()
    };
    let body = body::render(&fleetcmd_gateway::render::job(&job));
    insta::assert_snapshot!("xmpp_job_result", body);
}

#[test]
fn approval_request_body_snapshot() {
    let reply = Reply {
        header: "job 0190ab12-34cd-7ef0 `reboot` on role=web needs 1 approval — asked by xmpp:alice@localhost".to_string(),
        lines: vec![
            "an approver other than the requester may approve within 15 min".to_string(),
        ],
        actions: vec![
            Action {
                label: "Approve".to_string(),
                command: "approve 0190ab12-34cd-7ef0".to_string(),
                danger: false,
            },
            Action {
                label: "Deny".to_string(),
                command: "deny 0190ab12-34cd-7ef0".to_string(),
                danger: true,
            },
        ],
        ..Reply::default()
    };
    insta::assert_snapshot!("xmpp_approval_request", body::render(&reply));
}
