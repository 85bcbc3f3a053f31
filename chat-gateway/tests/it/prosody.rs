//! A real prosody for tests, started on a free loopback port with its own
//! config, data directory and a throwaway CA (STARTTLS is required by the
//! server), and an ordinary XMPP user on it, built on the adapter's public
//! client module. Shared by the gateway's XMPP tests and the workspace's
//! test of two gateway processes on one room (`tests/tests/it/main.rs`
//! includes this file by path), so it depends on nothing but std, tokio,
//! tempfile, rcgen and the gateway's XMPP client.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use fleetcmd_gateway::adapters::xmpp::XmppConfig;
use fleetcmd_gateway::adapters::xmpp::client::{Connection, Reader, Writer};
use fleetcmd_gateway::adapters::xmpp::jid::Jid;
use fleetcmd_gateway::adapters::xmpp::stanza::{self, NS_MUC_USER};
use fleetcmd_gateway::adapters::xmpp::xml::{Element, NS_CLIENT};
use tokio::process::{Child, Command};

const PROSODY: &str = "/usr/bin/prosody";
const PROSODYCTL: &str = "/usr/bin/prosodyctl";
/// A room whose occupants' real JIDs everyone sees.
pub(crate) const OPS: &str = "ops@conference.localhost";
/// The bot's account and its nickname in rooms.
pub(crate) const BOT: &str = "fleetbot@localhost";
pub(crate) const NICK: &str = "fleetcmd";
/// Every account's password.
pub(crate) const PASSWORD: &str = "correct horse battery staple";
/// One expected stanza.
pub(crate) const WAIT: Duration = Duration::from_secs(10);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// A prosody server in a temporary directory.
pub(crate) struct Prosody {
    dir: tempfile::TempDir,
    pub(crate) port: u16,
    child: Option<Child>,
}

impl Prosody {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The CA that signed the server's certificate.
    pub(crate) fn ca(&self) -> PathBuf {
        self.path("certs/ca.pem")
    }

    pub(crate) async fn start() -> Prosody {
        Prosody::start_with("").await
    }

    /// `extra` is Lua appended to the global section (later settings win).
    pub(crate) async fn start_with(extra: &str) -> Prosody {
        for bin in [PROSODY, PROSODYCTL] {
            assert!(
                Path::new(bin).exists(),
                "{bin} not found: the XMPP adapter tests need a real prosody; install it with `apt-get install -y prosody`"
            );
        }
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = Prosody {
            dir,
            port: free_port(),
            child: None,
        };
        p.write_certs();
        p.write_config(extra);
        // Accounts: registered with prosodyctl (hashed, as in production).
        let mut regs = Vec::new();
        for user in ["alice", "mallory", "fleetbot"] {
            let mut cmd = Command::new(PROSODYCTL);
            cmd.arg("--config")
                .arg(p.path("prosody.cfg.lua"))
                .args(["register", user, "localhost", PASSWORD])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .kill_on_drop(true);
            regs.push((user, cmd.output()));
        }
        for (user, out) in regs {
            let out = tokio::time::timeout(Duration::from_secs(10), out)
                .await
                .unwrap_or_else(|_| panic!("prosodyctl register {user}: timed out"))
                .unwrap_or_else(|e| panic!("prosodyctl register {user}: {e}"));
            assert!(
                out.status.success(),
                "prosodyctl register {user}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut p = p;
        p.spawn().await;
        p
    }

    fn write_certs(&self) {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        };
        let certs = self.path("certs");
        std::fs::create_dir_all(&certs).unwrap_or_else(|e| panic!("{e}"));
        let ca_key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| panic!("{e}"));
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "fleetcmd xmpp test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).unwrap_or_else(|e| panic!("{e}"));
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let mut leaf = CertificateParams::new(vec![
            "localhost".to_string(),
            "conference.localhost".to_string(),
            "anon.localhost".to_string(),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        leaf.distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = leaf
            .signed_by(&key, &issuer)
            .unwrap_or_else(|e| panic!("{e}"));
        for (name, pem) in [
            ("ca.pem", ca_cert.pem()),
            ("server.crt", cert.pem()),
            ("server.key", key.serialize_pem()),
        ] {
            std::fs::write(certs.join(name), pem).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    fn write_config(&self, extra: &str) {
        let d = self.dir.path().display();
        let cfg = format!(
            r#"-- written by fleetcmd's XMPP adapter tests
pidfile = "{d}/prosody.pid"
data_path = "{d}/data"
certificates = "{d}/certs"
run_as_root = true
interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {port} }}
c2s_direct_tls_ports = {{ }}
s2s_ports = {{ }}
component_ports = {{ }}
http_ports = {{ }}
https_ports = {{ }}
modules_enabled = {{ "roster"; "saslauth"; "tls"; "disco"; "ping"; "posix" }}
modules_disabled = {{ "s2s" }}
authentication = "internal_hashed"
storage = "internal"
c2s_require_encryption = true
allow_registration = false
log = {{ debug = "{d}/prosody.log" }}
ssl = {{ certificate = "{d}/certs/server.crt"; key = "{d}/certs/server.key" }}
{extra}

VirtualHost "localhost"

-- Real JIDs visible to every occupant: the bot can identify people.
Component "conference.localhost" "muc"
    muc_room_default_public_jids = true

-- Real JIDs only for moderators: the bot (a participant) cannot.
Component "anon.localhost" "muc"
    muc_room_default_public_jids = false
    muc_room_locking = false
"#,
            port = self.port
        );
        std::fs::create_dir_all(self.path("data")).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(self.path("prosody.cfg.lua"), cfg).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Starts prosody in the foreground and waits for its port.
    pub(crate) async fn spawn(&mut self) {
        let log = std::fs::File::create(self.path("stdout.log")).unwrap_or_else(|e| panic!("{e}"));
        let err = log.try_clone().unwrap_or_else(|e| panic!("{e}"));
        let child = Command::new(PROSODY)
            .arg("--config")
            .arg(self.path("prosody.cfg.lua"))
            .arg("-F")
            .stdout(log)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {PROSODY}: {e}"));
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("prosody exited with {status}: {}", self.logs());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "prosody did not listen on {} within 10 s: {}",
                self.port,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// The server's debug log, oldest first.
    pub(crate) fn server_log(&self) -> String {
        std::fs::read_to_string(self.path("prosody.log")).unwrap_or_default()
    }

    /// How each ended session of `full_jid` ended, oldest first, as the
    /// server logged it: "" for a client that closed its stream, else the
    /// reason ("unexpected eof while reading": the connection dropped).
    pub(crate) fn ended_sessions(&self, full_jid: &str) -> Vec<String> {
        let bare = full_jid.split('/').next().unwrap_or(full_jid);
        let unbound = format!("Unbinding resource for {full_jid} ({bare})");
        self.server_log()
            .lines()
            .filter_map(|l| l.split_once(&unbound))
            .map(|(_, why)| why.trim_start_matches(": ").to_string())
            .collect()
    }

    pub(crate) fn logs(&self) -> String {
        let out = std::fs::read_to_string(self.path("stdout.log")).unwrap_or_default();
        let log = self.server_log();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        format!(
            "{out}\n--- prosody.log (last lines, newest first) ---\n{}",
            tail.join("\n")
        )
    }

    pub(crate) fn config(&self, jid: &str) -> XmppConfig {
        let mut cfg = XmppConfig::new(jid, PASSWORD);
        cfg.host = Some("127.0.0.1".into());
        cfg.port = Some(self.port);
        cfg.ca_file = Some(self.ca());
        cfg.keepalive_secs = 5;
        cfg
    }

    pub(crate) fn bot_config(&self, rooms: &[&str]) -> XmppConfig {
        let mut cfg = self.config(BOT);
        cfg.rooms = rooms.iter().map(|r| r.to_string()).collect();
        cfg.nick = NICK.to_string();
        cfg
    }
}

pub(crate) fn jid(s: &str) -> Jid {
    Jid::parse(s).unwrap_or_else(|e| panic!("{e}"))
}

pub(crate) fn body_of(el: &Element) -> Option<String> {
    el.child("body", NS_CLIENT).map(Element::text)
}

pub(crate) fn from_of(el: &Element) -> &str {
    el.attr("from").unwrap_or_default()
}

/// A message the bot posted in `room`.
pub(crate) fn bot_said_in(room: &str, el: &Element) -> Option<String> {
    (el.name == "message"
        && el.attr("type") == Some("groupchat")
        && from_of(el) == format!("{room}/{NICK}"))
    .then(|| body_of(el))
    .flatten()
}

/// An ordinary XMPP user.
pub(crate) struct User {
    reader: Reader,
    writer: Writer,
    name: String,
    /// Stanzas read but not yet matched by `wait_for`.
    backlog: VecDeque<Element>,
    /// Everything received, for failure messages and "never" assertions.
    pub(crate) seen: Vec<Element>,
}

impl User {
    pub(crate) async fn login(p: &Prosody, name: &str) -> User {
        let opts = p
            .config(&format!("{name}@localhost/test"))
            .client_options()
            .unwrap_or_else(|e| panic!("{e}"));
        let conn = Connection::connect(&opts)
            .await
            .unwrap_or_else(|e| panic!("{name} login: {e}\n{}", p.logs()));
        let mut u = User {
            reader: conn.reader,
            writer: conn.writer,
            name: name.to_string(),
            backlog: VecDeque::new(),
            seen: Vec::new(),
        };
        u.send("<presence/>").await;
        u
    }

    pub(crate) async fn send(&mut self, xml: &str) {
        self.writer
            .send(xml)
            .await
            .unwrap_or_else(|e| panic!("{} send: {e}", self.name));
    }

    pub(crate) async fn say(&mut self, room: &str, text: &str) {
        let xml = stanza::message(&jid(room), "groupchat", &stanza::new_id(), text, None);
        self.send(&xml).await;
    }

    pub(crate) async fn tell(&mut self, to: &str, text: &str) {
        let xml = stanza::message(&jid(to), "chat", &stanza::new_id(), text, None);
        self.send(&xml).await;
    }

    /// The first stanza (backlog first) matching `pred`, within [`WAIT`].
    pub(crate) async fn wait_for(
        &mut self,
        what: &str,
        pred: impl Fn(&Element) -> bool,
    ) -> Element {
        self.wait_within(WAIT, what, pred).await
    }

    /// The first stanza (backlog first) matching `pred`, within `wait`.
    pub(crate) async fn wait_within(
        &mut self,
        wait: Duration,
        what: &str,
        pred: impl Fn(&Element) -> bool,
    ) -> Element {
        if let Some(i) = self.backlog.iter().position(&pred)
            && let Some(el) = self.backlog.remove(i)
        {
            return el;
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let next = tokio::time::timeout_at(deadline, self.reader.next()).await;
            match next {
                Ok(Ok(el)) => {
                    self.seen.push(el.clone());
                    if pred(&el) {
                        return el;
                    }
                    self.backlog.push_back(el);
                }
                Ok(Err(e)) => panic!("{}: stream ended waiting for {what}: {e}", self.name),
                Err(_) => panic!(
                    "{}: no {what} within {wait:?}; received:\n{:#?}",
                    self.name,
                    self.seen.iter().rev().take(12).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// The body of the next message the bot posts in `room` containing `needle`.
    pub(crate) async fn bot_reply(&mut self, room: &str, needle: &str) -> Element {
        self.wait_for(
            &format!("a message from the bot containing {needle:?}"),
            |el| bot_said_in(room, el).is_some_and(|b| b.contains(needle)),
        )
        .await
    }

    /// Joins `room` as `nick`; unlocks the room if this created it.
    pub(crate) async fn join(&mut self, room: &str, nick: &str) {
        self.send(&stanza::join(&jid(room), nick)).await;
        let me = format!("{room}/{nick}");
        let presence = self
            .wait_for(&format!("self-presence in {room}"), |el| {
                el.name == "presence"
                    && from_of(el) == me
                    && (el.attr("type") == Some("error") || statuses(el).contains(&110))
            })
            .await;
        assert_ne!(
            presence.attr("type"),
            Some("error"),
            "{} could not join {room}: {presence:#?}",
            self.name
        );
        let codes = statuses(&presence);
        assert!(codes.contains(&110), "{presence:#?}");
        if codes.contains(&201) {
            self.send(&stanza::instant_room(&jid(room))).await;
            self.wait_for("the instant-room result", |el| {
                el.name == "iq" && el.attr("type") == Some("result") && from_of(el) == room
            })
            .await;
        }
    }
}

fn statuses(presence: &Element) -> Vec<u16> {
    presence
        .child("x", NS_MUC_USER)
        .map(|x| {
            x.elements()
                .filter(|c| c.name == "status")
                .filter_map(|c| c.attr("code").and_then(|c| c.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}
