//! The IRC adapter against a real ngircd started by each test on free
//! loopback ports, with a small raw IRC client in the test as the user
//! (`alice`, `mallory`…), and the whole gateway loop
//! (`fleetcmd_gateway::serve`) over the support fake controller.
//!
//! ngircd does not offer IRCv3 `message-tags`, `account-tag` or SASL, so
//! those are tested against a scripted server speaking the IRCv3 wire
//! format (`caps_sasl_account_tags_and_dead_link_against_a_scripted_server`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fleetcmd_core::job::JobSpec;
use fleetcmd_gateway::adapters::irc::render::{RenderLimits, render};
use fleetcmd_gateway::adapters::irc::{IrcAdapter, IrcConfig, LinkStatus};
use fleetcmd_gateway::adapters::{Action, ChatAdapter, Reply};
use fleetcmd_gateway::router::Router;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use tokio::time::{Instant, timeout};

use crate::ngircd::{NETWORK, Ngircd, test_pki};
use crate::support::{FakeController, agent, failed_job, router_for};

const ALICE_ID: &str = "irc:test:alice!~alice@127.0.0.1";

// ------------------------------------------------------------ raw client

/// One line received by the test client, raw bytes kept.
#[derive(Clone, Debug)]
pub(crate) struct Line {
    raw: Vec<u8>,
    at: Instant,
    pub(crate) nick: String,
    pub(crate) command: String,
    params: Vec<String>,
}

impl Line {
    fn parse(raw: Vec<u8>) -> Line {
        let text = String::from_utf8_lossy(&raw).into_owned();
        let mut rest = text.trim_end_matches(['\r', '\n']);
        let mut nick = String::new();
        if let Some(after) = rest.strip_prefix(':') {
            let (src, tail) = after.split_once(' ').unwrap_or((after, ""));
            nick = src.split(['!', '@']).next().unwrap_or("").to_string();
            rest = tail;
        }
        let (command, mut ps) = rest.split_once(' ').unwrap_or((rest, ""));
        let mut params = Vec::new();
        while !ps.is_empty() {
            if let Some(t) = ps.strip_prefix(':') {
                params.push(t.to_string());
                break;
            }
            let (p, tail) = ps.split_once(' ').unwrap_or((ps, ""));
            params.push(p.to_string());
            ps = tail;
        }
        Line {
            raw,
            at: Instant::now(),
            nick,
            command: command.to_string(),
            params,
        }
    }

    pub(crate) fn text(&self) -> &str {
        self.params.last().map_or("", String::as_str)
    }

    fn is_privmsg(&self, from: &str, to: &str) -> bool {
        self.command == "PRIVMSG"
            && self.nick.eq_ignore_ascii_case(from)
            && self
                .params
                .first()
                .is_some_and(|t| t.eq_ignore_ascii_case(to))
    }
}

/// A user's IRC connection.
pub(crate) struct Client {
    nick: String,
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
    seen: Vec<String>,
}

impl Client {
    pub(crate) async fn connect(port: u16, nick: &str, user: &str) -> Client {
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("client connect");
        let (r, w) = tcp.into_split();
        let mut c = Client {
            nick: nick.to_string(),
            r: BufReader::new(r),
            w,
            seen: Vec::new(),
        };
        c.send(&format!("NICK {nick}")).await;
        c.send(&format!("USER {user} 0 * :{user}")).await;
        c.until(5, "welcome", |l| l.command == "001").await;
        c
    }

    pub(crate) async fn send(&mut self, line: &str) {
        self.w
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .expect("client write");
    }

    pub(crate) async fn join(&mut self, chan: &str) {
        self.send(&format!("JOIN {chan}")).await;
        self.until(5, "end of NAMES", |l| l.command == "366").await;
    }

    /// The next line (PINGs are answered and skipped); `None` at EOF.
    async fn next(&mut self) -> Option<Line> {
        loop {
            let mut raw = Vec::new();
            let n = self
                .r
                .read_until(b'\n', &mut raw)
                .await
                .expect("client read");
            if n == 0 {
                return None;
            }
            let line = Line::parse(raw);
            self.seen
                .push(String::from_utf8_lossy(&line.raw).trim_end().to_string());
            if line.command == "PING" {
                let token = line.text().to_string();
                self.send(&format!("PONG :{token}")).await;
                continue;
            }
            return Some(line);
        }
    }

    /// Lines up to and including the first that `done` accepts; fails the
    /// test after `secs` seconds, showing what was seen.
    pub(crate) async fn until(
        &mut self,
        secs: u64,
        what: &str,
        mut done: impl FnMut(&Line) -> bool,
    ) -> Vec<Line> {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let line = match timeout(
                deadline.saturating_duration_since(Instant::now()),
                self.next(),
            )
            .await
            {
                Ok(Some(l)) => l,
                Ok(None) => panic!(
                    "{}: connection closed waiting for {what}; seen:\n{}",
                    self.nick,
                    self.seen.join("\n")
                ),
                Err(_) => panic!(
                    "{}: no {what} within {secs} s; seen:\n{}",
                    self.nick,
                    self.seen.join("\n")
                ),
            };
            let stop = done(&line);
            out.push(line);
            if stop {
                return out;
            }
        }
    }

    /// The next `n` PRIVMSGs from `bot` to `to`.
    pub(crate) async fn bot_lines(
        &mut self,
        bot: &str,
        to: &str,
        n: usize,
        secs: u64,
    ) -> Vec<Line> {
        let mut count = 0;
        let lines = self
            .until(secs, &format!("{n} lines from the bot"), |l| {
                if l.is_privmsg(bot, to) {
                    count += 1;
                }
                count == n
            })
            .await;
        lines
            .into_iter()
            .filter(|l| l.is_privmsg(bot, to))
            .collect()
    }

    /// The bot's PRIVMSGs to `to` up to the one whose text `done` accepts.
    async fn replies(
        &mut self,
        bot: &str,
        to: &str,
        secs: u64,
        done: impl Fn(&str) -> bool,
    ) -> Vec<Line> {
        let lines = self
            .until(secs, "the bot's reply", |l| {
                l.is_privmsg(bot, to) && done(l.text())
            })
            .await;
        lines
            .into_iter()
            .filter(|l| l.is_privmsg(bot, to))
            .collect()
    }
}

// ------------------------------------------------------------- the bot

/// The policy after its `[[signers]]` block.
const POLICY: &str = r##"
[commands.uptime]
description = "Load average and uptime"
argv = ["/usr/bin/uptime"]

[roles.oncall]
commands = ["uptime"]
channels = ["irc:test:#ops"]

[[bindings]]
# Pinned to alice's username: another user taking the nick `alice` is not her.
subjects = ["irc:test:alice!~alice@*"]
roles = ["oncall"]
"##;

fn router_with(output: &[u8]) -> Arc<Router<FakeController>> {
    router_for(1, POLICY, |c| c.output = output.to_vec())
}

pub(crate) fn bot_config(port: u16) -> IrcConfig {
    let mut cfg: IrcConfig = toml::from_str(&format!(
        r##"
server = "127.0.0.1"
port = {port}
tls = false
nick = "fleetcmd"
network = "{NETWORK}"
channels = ["#ops"]
reconnect_min_ms = 100
reconnect_max_ms = 1000
rejoin_delay_ms = 300
"##
    ))
    .expect("bot config parses");
    cfg.interval_ms = 50; // fast unless a test measures the defaults
    assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
    cfg
}

/// The gateway loop over a live adapter; aborted (and the adapter with
/// it) when dropped.
struct Bot {
    status: watch::Receiver<LinkStatus>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Bot {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Bot {
    async fn start(router: Arc<Router<FakeController>>, cfg: &IrcConfig) -> Bot {
        let adapter = IrcAdapter::connect(cfg).await.expect("adapter starts");
        let status = adapter.status();
        let task = tokio::spawn(fleetcmd_gateway::serve(router, adapter));
        Bot { status, task }
    }

    async fn wait(
        &mut self,
        what: &str,
        secs: u64,
        ok: impl Fn(&LinkStatus) -> bool,
    ) -> LinkStatus {
        let res = timeout(Duration::from_secs(secs), self.status.wait_for(|s| ok(s)))
            .await
            .map(|r| r.map(|s| s.clone()));
        match res {
            Ok(Ok(s)) => s,
            Ok(Err(_)) => panic!("adapter stopped waiting for {what}"),
            Err(_) => panic!(
                "bot: no {what} within {secs} s; status {:?}",
                *self.status.borrow()
            ),
        }
    }
}

pub(crate) fn texts(lines: &[Line]) -> Vec<String> {
    lines.iter().map(|l| l.text().to_string()).collect()
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn alice_runs_a_command_in_the_channel_and_the_reply_names_her() {
    let server = Ngircd::start(None).await;
    let mut alice = Client::connect(server.port, "alice", "alice").await;
    alice.join("#ops").await;
    let router = router_with(b"up 3 days, load 0.5\n");
    let mut bot = Bot::start(router.clone(), &bot_config(server.port)).await;
    alice
        .until(10, "the bot joining", |l| {
            l.command == "JOIN" && l.nick == "fleetcmd"
        })
        .await;
    assert_eq!(
        bot.wait("registration", 5, |s| s.nick.is_some())
            .await
            .joined,
        ["#ops"]
    );

    alice.send("PRIVMSG #ops :!run uptime on all").await;
    let got = texts(&alice.bot_lines("fleetcmd", "#ops", 7, 10).await);
    let id = got[0].split(' ').nth(1).expect("job id").to_string();
    assert_eq!(
        got,
        [
            format!("job {id} `uptime` on all by {ALICE_ID}: 2 targets"),
            format!("job {id} succeeded (2/2 ok) — asked by {ALICE_ID}"),
            "· `uptime` on all".to_string(),
            "» web-1 — ok, exit 0, 7 ms".to_string(),
            "  | up 3 days, load 0.5".to_string(),
            "» web-2 — ok, exit 0, 7 ms".to_string(),
            "  | up 3 days, load 0.5".to_string(),
        ]
    );
    let subs = router.controller().submitted();
    assert_eq!(subs.len(), 1);
    let spec = JobSpec::from_bytes(&subs[0].spec).expect("signed spec");
    assert_eq!(spec.requester.as_str(), ALICE_ID);
    assert_eq!(spec.channel, "irc:test:#ops");

    // A private message is direct: the reply goes back to her nick, and the
    // role bound to #ops is not usable there.
    alice.send("PRIVMSG fleetcmd :whoami").await;
    let dm = alice.bot_lines("fleetcmd", "alice", 3, 5).await;
    assert_eq!(
        texts(&dm),
        [
            format!("you are {ALICE_ID}"),
            "· roles: oncall".to_string(),
            "· usable in irc:test:alice: none".to_string(),
        ]
    );
}

#[tokio::test]
async fn nick_collision_the_bot_takes_an_alternative_and_still_answers() {
    let server = Ngircd::start(None).await;
    let _squatter = Client::connect(server.port, "fleetcmd", "squat").await;
    let _alt_squatter = Client::connect(server.port, "fcmd", "squat").await;
    let mut alice = Client::connect(server.port, "alice", "alice").await;
    alice.join("#ops").await;
    let mut cfg = bot_config(server.port);
    cfg.alt_nicks = vec!["fcmd".into()];
    let mut bot = Bot::start(router_with(b"x"), &cfg).await;
    // fleetcmd and fcmd are taken: the next candidate is fleetcmd_1.
    alice
        .until(10, "the bot joining", |l| {
            l.command == "JOIN" && l.nick == "fleetcmd_1"
        })
        .await;
    let st = bot.wait("registration", 5, |s| s.nick.is_some()).await;
    assert_eq!(st.nick.as_deref(), Some("fleetcmd_1"));

    alice.send("PRIVMSG #ops :!whoami").await;
    let got = alice.bot_lines("fleetcmd_1", "#ops", 2, 5).await;
    assert_eq!(
        texts(&got),
        [format!("you are {ALICE_ID}"), "· roles: oncall".to_string()]
    );
}

#[tokio::test]
async fn a_spoofer_taking_alices_nick_gets_none_of_her_rights() {
    let server = Ngircd::start(None).await;
    let mut alice = Client::connect(server.port, "alice", "alice").await;
    alice.join("#ops").await;
    let router = router_with(b"x");
    let mut bot = Bot::start(router.clone(), &bot_config(server.port)).await;
    bot.wait("joining #ops", 10, |s| s.joined.len() == 1).await;
    alice.send("PRIVMSG #ops :!whoami").await;
    let got = alice.bot_lines("fleetcmd", "#ops", 2, 5).await;
    assert_eq!(texts(&got)[1], "· roles: oncall");

    // alice leaves; mallory (username mallory) takes her nick.
    alice.send("QUIT :bye").await;
    while alice.next().await.is_some() {}
    let mut mallory = Client::connect(server.port, "mallory", "mallory").await;
    mallory.join("#ops").await;
    mallory.send("NICK alice").await;
    mallory
        .until(5, "the nick change", |l| {
            l.command == "NICK" && l.text() == "alice"
        })
        .await;
    mallory.nick = "alice".into();

    let spoofed = "irc:test:alice!~mallory@127.0.0.1";
    mallory.send("PRIVMSG #ops :!run uptime on all").await;
    let got = texts(&mallory.bot_lines("fleetcmd", "#ops", 1, 5).await);
    assert!(
        got[0].starts_with("· refused: ")
            && got[0].contains("you have no roles")
            && got[0].ends_with(&format!("nothing was submitted — asked by {spoofed}")),
        "{got:?}"
    );
    mallory.send("PRIVMSG #ops :!whoami").await;
    let got = texts(&mallory.bot_lines("fleetcmd", "#ops", 2, 5).await);
    assert_eq!(
        got,
        [format!("you are {spoofed}"), "· roles: none".to_string()]
    );
    assert!(router.controller().submitted().is_empty());
}

#[tokio::test]
async fn a_spoofer_who_takes_the_nick_after_a_private_request_gets_no_private_reply() {
    // Alice shares #ops with the bot: it sees her QUIT.
    spoofer_after_a_private_request(true).await;
}

#[tokio::test]
async fn a_spoofer_who_takes_the_nick_of_a_user_outside_the_bots_channels_gets_no_private_reply() {
    // Alice is in no channel of the bot's: her QUIT is never shown to it,
    // only asking the server who holds the nick before replying catches it.
    spoofer_after_a_private_request(false).await;
}

async fn spoofer_after_a_private_request(alice_in_channel: bool) {
    let server = Ngircd::start(None).await;
    let mut alice = Client::connect(server.port, "alice", "alice").await;
    if alice_in_channel {
        alice.join("#ops").await;
    }
    // Alice may run in private too; her job runs for a while.
    let policy = POLICY.replace(
        r#"channels = ["irc:test:#ops"]"#,
        r#"channels = ["irc:test:#ops", "irc:test:alice"]"#,
    );
    let router = router_for(1, &policy, |c| {
        c.output = b"up 3 days\n".to_vec();
        c.running_polls.store(200, Ordering::SeqCst);
    });
    let mut bot = Bot::start(router.clone(), &bot_config(server.port)).await;
    bot.wait("joining #ops", 10, |s| s.joined.len() == 1).await;
    alice.send("PRIVMSG fleetcmd :run uptime on all").await;
    let first = texts(&alice.bot_lines("fleetcmd", "alice", 1, 5).await);
    assert!(first[0].contains(ALICE_ID), "{first:?}");

    // Alice leaves before her job ends; mallory (another user name, no
    // identd either) registers with her nick at once.
    alice.send("QUIT :bye").await;
    while alice.next().await.is_some() {}
    let mut mallory = Client::connect(server.port, "alice", "mallory").await;
    let mut done = false;
    for _ in 0..1000 {
        if router.controller().running_polls.load(Ordering::SeqCst) == 0 {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(done, "the job never finished");
    assert_eq!(router.controller().submitted().len(), 1);

    // Whatever the bot sent to the nick since arrives before the answer to
    // mallory's own request (one ordered queue): none of it is alice's.
    mallory.send("PRIVMSG fleetcmd :whoami").await;
    let got = texts(
        &mallory
            .replies("fleetcmd", "alice", 5, |t| t.starts_with("you are "))
            .await,
    );
    assert_eq!(
        got,
        ["you are irc:test:alice!~mallory@127.0.0.1"],
        "alice's private reply reached mallory"
    );
}

#[tokio::test]
async fn long_multibyte_output_is_split_under_512_bytes_and_nothing_is_lost() {
    // 1440 characters, 2520 bytes: 2-, 3- and 4-byte characters mixed.
    let long = "é€𝄞 abc ".repeat(180);
    let long = long.trim_end().to_string();
    let server = Ngircd::start(None).await;
    let mut alice = Client::connect(server.port, "alice", "alice").await;
    alice.join("#ops").await;
    let output = format!("{long}\nend\n");
    let mut bot = Bot::start(router_with(output.as_bytes()), &bot_config(server.port)).await;
    bot.wait("joining #ops", 10, |s| s.joined.len() == 1).await;
    alice.send("PRIVMSG #ops :!run uptime on all").await;
    let lines = alice
        .replies("fleetcmd", "#ops", 15, |t| t == "  | end")
        .await;
    let lines: Vec<&Line> = lines.iter().collect();
    let mut longest = 0;
    for l in &lines {
        assert!(
            l.raw.len() <= 512,
            "{} bytes: {:?}",
            l.raw.len(),
            String::from_utf8_lossy(&l.raw)
        );
        assert!(
            std::str::from_utf8(&l.raw).is_ok(),
            "split inside a character: {:?}",
            l.raw
        );
        longest = longest.max(l.raw.len());
    }
    // The budget is the real one (our hostmask learnt from the JOIN echo),
    // not a needlessly small one: a line is short of 512 by less than one
    // 4-byte character.
    assert!(longest > 508, "longest line {longest} bytes");
    let texts = texts(&lines.into_iter().cloned().collect::<Vec<_>>());
    let start = texts
        .iter()
        .position(|t| t.starts_with("» web-1"))
        .expect("web-1 section");
    let mut joined = String::new();
    for t in &texts[start + 1..] {
        if let Some(first) = t.strip_prefix("  | ") {
            if !joined.is_empty() {
                joined.push('\n');
            }
            joined.push_str(first);
        } else if let Some(cont) = t.strip_prefix("  … ") {
            joined.push_str(cont);
        } else {
            panic!("unexpected line {t:?}");
        }
    }
    assert_eq!(joined, format!("{long}\nend"));
}

#[tokio::test]
async fn flood_control_spaces_lines_as_configured() {
    let server = Ngircd::start(None).await;
    let mut alice = Client::connect(server.port, "alice", "alice").await;
    alice.join("#ops").await;
    let mut cfg = bot_config(server.port);
    cfg.burst = 3;
    cfg.interval_ms = 250;
    let output: String = (1..=6).map(|i| format!("line {i}\n")).collect();
    let mut bot = Bot::start(router_with(output.as_bytes()), &cfg).await;
    bot.wait("joining #ops", 10, |s| s.joined.len() == 1).await;
    alice.send("PRIVMSG #ops :!run uptime on all").await;
    // Submitted header + final header + command line + 2 × (title + 6 lines).
    let got = alice.bot_lines("fleetcmd", "#ops", 17, 15).await;
    assert_eq!(got[16].text(), "  | line 6");
    let t0 = got[0].at;
    let interval = Duration::from_millis(250);
    let at: Vec<Duration> = got.iter().map(|l| l.at - t0).collect();
    // The burst goes at once…
    // (without a burst the third line would come two intervals later).
    assert!(at[2] < Duration::from_millis(400), "{at:?}");
    // …then one line per interval, never faster (100 ms for delivery jitter;
    // without the bucket all 17 lines arrive within a few ms).
    for (i, t) in at.iter().enumerate() {
        let earliest = interval * (i + 1).saturating_sub(3) as u32;
        assert!(
            *t + Duration::from_millis(100) >= earliest,
            "line {i} after {t:?}, before {earliest:?}: {at:?}"
        );
    }
    // …and not much slower either.
    assert!(at[16] < interval * 14 + Duration::from_secs(1), "{at:?}");
}

/// The router over one agent and a controller that reports the job's end
/// on `Watch` at once (a job done in a few ms).
fn quick_router(extra: &str) -> Arc<Router<FakeController>> {
    router_for(1, &format!("{POLICY}\n{extra}"), |c| {
        c.watch = true;
        c.agents = vec![agent("web-1", "web", true)];
    })
}

#[tokio::test]
async fn a_quick_job_on_one_host_is_one_line_and_needs_no_acknowledgement() {
    let server = Ngircd::start(None).await;
    let mut alice = Client::connect(server.port, "alice", "alice").await;
    alice.join("#ops").await;
    let mut bot = Bot::start(quick_router(""), &bot_config(server.port)).await;
    bot.wait("joining #ops", 10, |s| s.joined.len() == 1).await;
    alice.send("PRIVMSG #ops :!run uptime on all").await;
    let got = texts(&alice.bot_lines("fleetcmd", "#ops", 1, 10).await);
    let id = got[0].split(' ').nth(1).expect("job id").to_string();
    assert_eq!(
        got,
        [format!(
            "job {id} succeeded (1/1 ok) — asked by {ALICE_ID} · `uptime` on all » web-1 — ok, exit 0, 7 ms | up 3 days, load 0.5"
        )]
    );
    // Nothing else follows for that job: the next line is the next answer.
    alice.send("PRIVMSG #ops :!whoami").await;
    let next = texts(&alice.bot_lines("fleetcmd", "#ops", 1, 10).await);
    assert_eq!(next, [format!("you are {ALICE_ID}")]);
}

#[tokio::test]
async fn replies_waiting_for_the_flood_control_are_merged_and_stay_attributable() {
    const BOB_ID: &str = "irc:test:bob!~bob@127.0.0.1";
    let server = Ngircd::start(None).await;
    let mut alice = Client::connect(server.port, "alice", "alice").await;
    alice.join("#ops").await;
    let mut bob = Client::connect(server.port, "bob", "bob").await;
    bob.join("#ops").await;
    let mut cfg = bot_config(server.port);
    // One line at once, then one per second: replies pile up behind it.
    cfg.burst = 1;
    cfg.interval_ms = 1000;
    let bob_binding = "[[bindings]]\nsubjects = [\"irc:test:bob!~bob@*\"]\nroles = [\"oncall\"]\n";
    let mut bot = Bot::start(quick_router(bob_binding), &cfg).await;
    bot.wait("joining #ops", 10, |s| s.joined.len() == 1).await;
    for _ in 0..3 {
        alice.send("PRIVMSG #ops :!run uptime on all").await;
        bob.send("PRIVMSG #ops :!run uptime on all").await;
    }
    let mut replies = 0;
    let lines = alice
        .until(20, "six job results", |l| {
            if l.is_privmsg("fleetcmd", "#ops") {
                replies += l.text().matches("succeeded (1/1 ok)").count();
            }
            replies == 6
        })
        .await;
    let msgs: Vec<&Line> = lines
        .iter()
        .filter(|l| l.is_privmsg("fleetcmd", "#ops"))
        .collect();
    // Six replies in fewer messages than replies (without merging: six).
    assert!(msgs.len() < 6, "{:#?}", texts(&lines));
    let mut by_alice = 0;
    let mut by_bob = 0;
    for m in &msgs {
        assert!(m.raw.len() <= 512, "{} bytes", m.raw.len());
        // Each merged part is one whole reply naming who asked.
        for part in m.text().split(" ‖ ") {
            assert!(
                part.starts_with("job ") && part.ends_with("| up 3 days, load 0.5"),
                "{part:?} in {:?}",
                m.text()
            );
            if part.contains(&format!("asked by {ALICE_ID} ")) {
                by_alice += 1;
            } else if part.contains(&format!("asked by {BOB_ID} ")) {
                by_bob += 1;
            } else {
                panic!("{part:?} names nobody");
            }
        }
    }
    assert_eq!((by_alice, by_bob), (3, 3));
    // The flood control still holds: one message per interval after the
    // burst (100 ms for delivery jitter).
    for pair in msgs.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap + Duration::from_millis(100) >= Duration::from_secs(1),
            "{gap:?}"
        );
    }
}

#[tokio::test]
async fn the_bot_reconnects_after_a_server_restart_and_answers_again() {
    let mut server = Ngircd::start(None).await;
    let mut alice = Client::connect(server.port, "alice", "alice").await;
    alice.join("#ops").await;
    let mut bot = Bot::start(router_with(b"x"), &bot_config(server.port)).await;
    bot.wait("joining #ops", 10, |s| s.joined.len() == 1).await;

    server.stop();
    let eof = timeout(Duration::from_secs(5), async {
        while alice.next().await.is_some() {}
    })
    .await;
    assert!(eof.is_ok(), "alice's connection ends with the server");
    let st = bot
        .wait("noticing the dead link", 5, |s| s.nick.is_none())
        .await;
    assert_eq!(st.registrations, 1);
    server.spawn().await;

    let st = bot
        .wait("re-registration and rejoin", 10, |s| {
            s.registrations == 2 && s.joined.len() == 1
        })
        .await;
    assert_eq!(st.joined, ["#ops"]);
    assert!(
        !bot.task.is_finished(),
        "the gateway loop survived the reconnect"
    );
    let mut alice = Client::connect(server.port, "alice", "alice").await;
    alice.join("#ops").await;
    alice.send("PRIVMSG #ops :!whoami").await;
    let got = alice.bot_lines("fleetcmd", "#ops", 2, 5).await;
    assert_eq!(
        texts(&got),
        [format!("you are {ALICE_ID}"), "· roles: oncall".to_string()]
    );
}

#[tokio::test]
async fn a_kicked_bot_rejoins_after_the_delay() {
    let server = Ngircd::start(None).await;
    let mut alice = Client::connect(server.port, "alice", "alice").await;
    alice.join("#ops").await; // first in: channel operator
    let mut bot = Bot::start(router_with(b"x"), &bot_config(server.port)).await;
    bot.wait("joining #ops", 10, |s| s.joined.len() == 1).await;
    alice.send("KICK #ops fleetcmd :out").await;
    let kicked = alice.until(5, "the kick", |l| l.command == "KICK").await;
    let at = kicked.last().expect("kick line").at;
    let back = alice
        .until(5, "the bot rejoining", |l| {
            l.command == "JOIN" && l.nick == "fleetcmd"
        })
        .await;
    let delay = back.last().expect("join line").at - at;
    assert!(
        delay >= Duration::from_millis(250),
        "rejoined after {delay:?}"
    );
    alice.send("PRIVMSG #ops :!whoami").await;
    let got = alice.bot_lines("fleetcmd", "#ops", 2, 5).await;
    assert_eq!(texts(&got)[0], format!("you are {ALICE_ID}"));
}

#[tokio::test]
async fn tls_with_a_private_ca() {
    let pki = test_pki("fleetcmd test irc CA");
    let server = Ngircd::start(Some(&pki)).await;
    let ca = server.dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).expect("ca file");
    let mut alice = Client::connect(server.port, "alice", "alice").await;
    alice.join("#ops").await;
    let mut cfg = bot_config(server.tls_port.expect("tls port"));
    cfg.server = "localhost".into();
    cfg.tls = true;
    cfg.ca_file = Some(ca);
    let _bot = Bot::start(router_with(b"x"), &cfg).await;
    alice
        .until(10, "the bot joining over TLS", |l| {
            l.command == "JOIN" && l.nick == "fleetcmd"
        })
        .await;
    alice.send("PRIVMSG #ops :!whoami").await;
    let got = alice.bot_lines("fleetcmd", "#ops", 2, 5).await;
    assert_eq!(texts(&got)[0], format!("you are {ALICE_ID}"));

    // The same server is refused when the bot trusts another CA.
    let other = tempfile::NamedTempFile::new().expect("tempfile");
    std::fs::write(other.path(), test_pki("some other CA").ca_pem).expect("other ca");
    let mut cfg2 = cfg.clone();
    cfg2.nick = "fleetcmd2".into();
    cfg2.ca_file = Some(other.path().to_path_buf());
    let adapter = IrcAdapter::connect(&cfg2).await.expect("adapter starts");
    let mut status = adapter.status();
    let registered = timeout(
        Duration::from_millis(1500),
        status.wait_for(|s| s.nick.is_some()),
    )
    .await;
    assert!(
        registered.is_err(),
        "registered despite an untrusted certificate"
    );
}

#[tokio::test]
async fn hostile_output_arrives_inert() {
    let hostile = b"@channel <!here> `rm -rf /`\n!run reboot on all\n\x01ACTION dances\x01\n\
\x0304red\x03 and \x02bold\x02\nfoo\r\nQUIT :bye\n  !approve 0189\nfleetcmd: run reboot on all\n";
    let server = Ngircd::start(None).await;
    let mut alice = Client::connect(server.port, "alice", "alice").await;
    alice.join("#ops").await;
    let mut bot = Bot::start(router_with(hostile), &bot_config(server.port)).await;
    bot.wait("joining #ops", 10, |s| s.joined.len() == 1).await;
    alice.send("PRIVMSG #ops :!run uptime on all").await;
    // Submitted header + final header + command line + 2 × (title + 8 lines).
    let got = alice.bot_lines("fleetcmd", "#ops", 21, 10).await;
    for l in &got {
        let body = &l.raw[..l.raw.len() - 2];
        assert!(
            l.raw.ends_with(b"\r\n") && !body.iter().any(|&b| b < 0x20 || b == 0x7f),
            "control bytes on the wire: {:?}",
            String::from_utf8_lossy(&l.raw)
        );
        let t = l.text().trim_start();
        assert!(
            !t.starts_with(['!', '@', '.', '/', '\x01'])
                && !t.to_lowercase().starts_with("fleetcmd"),
            "line could trigger a bot: {t:?}"
        );
    }
    let texts = texts(&got);
    let web1 = texts
        .iter()
        .position(|t| t.starts_with("» web-1"))
        .expect("web-1");
    assert_eq!(
        texts[web1 + 1..web1 + 9],
        [
            "  | @channel <!here> `rm -rf /`",
            "  | !run reboot on all",
            "  | ACTION dances",
            "  | 04red and bold",
            "  | foo",
            "  | QUIT :bye",
            "  |   !approve 0189",
            "  | fleetcmd: run reboot on all",
        ]
    );
    // The bot did not quit (no QUIT was injected) and still answers.
    assert!(
        !alice
            .seen
            .iter()
            .any(|l| l.split(' ').nth(1) == Some("QUIT")),
        "{:#?}",
        alice.seen
    );
    alice.send("PRIVMSG #ops :!whoami").await;
    let got = alice.bot_lines("fleetcmd", "#ops", 2, 5).await;
    assert_eq!(got[0].text(), format!("you are {ALICE_ID}"));
}

// ------------------------------------------------- scripted IRCv3 server

struct Script {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

impl Script {
    async fn accept(l: &tokio::net::TcpListener) -> Script {
        let (sock, _) = timeout(Duration::from_secs(5), l.accept())
            .await
            .expect("the bot connects within 5 s")
            .expect("accept");
        let (r, w) = sock.into_split();
        Script {
            r: BufReader::new(r),
            w,
        }
    }

    async fn expect(&mut self, want: &str) {
        let mut line = String::new();
        let n = timeout(Duration::from_secs(5), self.r.read_line(&mut line))
            .await
            .unwrap_or_else(|_| panic!("no line within 5 s; wanted {want:?}"))
            .expect("read");
        assert!(n > 0, "connection closed; wanted {want:?}");
        assert!(line.ends_with("\r\n"), "{line:?} not CRLF-terminated");
        assert_eq!(line.trim_end_matches("\r\n"), want);
    }

    async fn send(&mut self, raw: &[u8]) {
        self.w.write_all(raw).await.expect("script write");
    }

    async fn line(&mut self, line: &str) {
        self.send(format!("{line}\r\n").as_bytes()).await;
    }
}

async fn next_msg(a: &mut IrcAdapter) -> fleetcmd_gateway::adapters::Incoming {
    timeout(Duration::from_secs(5), a.recv())
        .await
        .expect("a message within 5 s")
        .expect("the adapter is running")
}

#[tokio::test]
async fn caps_sasl_account_tags_and_dead_link_against_a_scripted_server() {
    use base64::Engine as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let pw = tempfile::NamedTempFile::new().expect("tempfile");
    crate::support::write_private(pw.path(), "s3cret\n");
    let cfg: IrcConfig = toml::from_str(&format!(
        r##"
server = "127.0.0.1"
port = {port}
tls = false
server_password = "hunter2"
nick = "fleetcmd"
network = "fake"
channels = ["#ops"]
sasl_account = "bot"
sasl_password_file = "{}"
ping_interval_ms = 300
ping_timeout_ms = 300
reconnect_min_ms = 50
"##,
        pw.path().display()
    ))
    .expect("config parses");
    let mut adapter = IrcAdapter::connect(&cfg).await.expect("adapter starts");
    let mut s = Script::accept(&listener).await;
    s.expect("CAP LS 302").await;
    s.expect("PASS :hunter2").await;
    s.expect("NICK fleetcmd").await;
    s.expect("USER fleetcmd 0 * :fleetcmd chat gateway").await;
    s.line(":fake.server CAP * LS * :multi-prefix message-tags")
        .await;
    s.line(":fake.server CAP * LS :account-tag sasl=PLAIN,EXTERNAL")
        .await;
    s.expect("CAP REQ :message-tags account-tag sasl").await;
    s.line(":fake.server CAP fleetcmd ACK :message-tags account-tag sasl")
        .await;
    s.expect("AUTHENTICATE PLAIN").await;
    s.line("AUTHENTICATE +").await;
    let payload = base64::engine::general_purpose::STANDARD.encode("\0bot\0s3cret");
    s.expect(&format!("AUTHENTICATE {payload}")).await;
    s.line(":fake.server 903 fleetcmd :SASL authentication successful")
        .await;
    s.expect("CAP END").await;
    s.line(":fake.server 001 fleetcmd :Welcome").await;
    s.expect("JOIN #ops").await;
    s.line(":fleetcmd!~fleetcmd@bot.example JOIN #ops").await;

    // The account tag names the sender, not the nick.
    s.line("@account=alice;time=2026-01-01T00:00:00.000Z :al!~al@a.example PRIVMSG #Ops :!whoami")
        .await;
    let m = next_msg(&mut adapter).await;
    assert_eq!(
        (m.identity.as_str(), m.channel.as_str(), m.text.as_str()),
        ("irc:fake:alice", "irc:fake:#ops", "!whoami")
    );
    assert!(!m.direct && !m.from_bot);

    // Malformed lines and invalid UTF-8 are skipped; a tagged bot is a bot.
    s.send(b":only-a-prefix\r\n@tags-only\r\n\xff\xfe\x01 garbage\r\n\r\n")
        .await;
    s.line("@draft/bot;+x=a\\sb\\: :helper!h@h.example PRIVMSG #ops :!run uptime on all")
        .await;
    let m = next_msg(&mut adapter).await;
    assert_eq!(m.identity.as_str(), "irc:fake:helper!h@h.example");
    assert!(m.from_bot);

    // No account (`*`): the hostmask; a private message is direct.
    s.line("@account=* :bob!~bob@b.example PRIVMSG fleetcmd :help")
        .await;
    let m = next_msg(&mut adapter).await;
    assert_eq!(
        (m.identity.as_str(), m.channel.as_str(), m.direct),
        ("irc:fake:bob!~bob@b.example", "irc:fake:bob", true)
    );

    // NOTICEs and CTCP never reach the router.
    s.line(":bob!~bob@b.example NOTICE #ops :!run x").await;
    s.line(":bob!~bob@b.example PRIVMSG #ops :\x01ACTION !run x\x01")
        .await;
    s.line(":bob!~bob@b.example PRIVMSG #ops :third").await;
    assert_eq!(next_msg(&mut adapter).await.text, "third");

    s.line("PING :abc").await;
    s.expect("PONG :abc").await;
    let sent = adapter
        .send("irc:fake:bob", Reply::text("hello\r\nQUIT"))
        .await
        .expect("queued");
    assert_eq!(sent.channel, "irc:fake:bob");
    s.expect("PRIVMSG bob :hello  QUIT").await;
    assert!(!adapter.sender().can_edit());
    adapter
        .edit(&sent, Reply::text("edited"))
        .await
        .expect("edit posts again");
    s.expect("PRIVMSG bob :edited").await;
    assert!(
        adapter
            .send("irc:other:#ops", Reply::text("x"))
            .await
            .is_err()
    );

    // Silence: after ping_interval the bot PINGs; no answer within
    // ping_timeout means a dead link, and it reconnects.
    s.expect("PING :fleetcmd").await;
    let mut s2 = Script::accept(&listener).await;
    // Replies queued while the link is down go out once it is back (and
    // the channel is joined again).
    adapter
        .send("irc:fake:#ops", Reply::text("queued while down"))
        .await
        .expect("queued");
    s2.expect("CAP LS 302").await;
    s2.expect("PASS :hunter2").await;
    s2.expect("NICK fleetcmd").await;
    s2.expect("USER fleetcmd 0 * :fleetcmd chat gateway").await;
    // A server without CAP just welcomes.
    s2.line(":fake.server 433 * fleetcmd :Nickname already in use")
        .await;
    s2.expect("NICK fleetcmd_1").await;
    s2.line(":fake.server 001 fleetcmd_1 :Welcome").await;
    s2.expect("JOIN #ops").await;
    s2.line(":fleetcmd_1!~fleetcmd@bot.example JOIN #ops").await;
    s2.expect("PRIVMSG #ops :queued while down").await;
    s2.line(":carol!~c@c.example PRIVMSG #ops :still here")
        .await;
    let m = next_msg(&mut adapter).await;
    assert_eq!(
        (m.identity.as_str(), m.text.as_str()),
        ("irc:fake:carol!~c@c.example", "still here")
    );
    assert_eq!(adapter.status().borrow().registrations, 2);

    // Stopping sends QUIT and ends recv.
    adapter.stop_handle().stop();
    s2.expect("QUIT :fleetcmd gateway stopping").await;
    assert!(
        timeout(Duration::from_secs(5), adapter.recv())
            .await
            .expect("recv ends")
            .is_none()
    );
    drop(s);
}

// -------------------------------------------------------------- snapshots

fn limits() -> RenderLimits {
    RenderLimits {
        max_output_lines: 10,
        max_full_output_lines: 50,
        max_reply_lines: 40,
    }
}

#[test]
fn snapshot_job_result() {
    let mut stdout = String::from(
        "@channel look <!here>\n!run reboot on all\nuse `rm -rf /` ```now```\n\x01ACTION waves\x01 \x0304red\n",
    );
    for i in 1..=9 {
        stdout.push_str(&format!("line {i}\n"));
    }
    let job = failed_job(
        "uptime",
        ALICE_ID,
        stdout.as_bytes(),
        2,
        b"uptime: cannot open /proc/loadavg\r\nQUIT :injected\n",
    );
    let reply = fleetcmd_gateway::render::job(&job);
    insta::assert_snapshot!(render(&reply, limits()).join("\n"));
}

#[test]
fn snapshot_approval_request() {
    let reply = Reply {
        header: "job b302099a8057 `reboot` on role=web needs 1 approval — asked by irc:test:alice!~alice@127.0.0.1".into(),
        lines: vec![
            "expires in 15 min".into(),
            "!approve is for the approvers in the policy; the requester cannot approve".into(),
        ],
        actions: vec![
            Action {
                label: "approve".into(),
                command: "approve b302099a8057".into(),
                danger: false,
            },
            Action {
                label: "deny".into(),
                command: "deny b302099a8057".into(),
                danger: true,
            },
        ],
        ..Reply::default()
    };
    insta::assert_snapshot!(render(&reply, limits()).join("\n"));
}
