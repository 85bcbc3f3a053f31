//! The XMPP adapter: multi-user chat rooms (XEP-0045) and one-to-one chats
//! over a small client of our own ([`client`]: tokio + rustls + quick-xml).
//!
//! - Identity is `xmpp:<bare-jid>` of the sender's REAL account: in a room
//!   it is the JID the room reports for the occupant in presence, never the
//!   nickname ([`rooms`]). Rooms that hide real JIDs from the bot get their
//!   messages refused (logged, one warning reply).
//! - Channels are `xmpp:<room-bare-jid>` for rooms and `xmpp:<user-bare-jid>`
//!   for direct chats (`direct = true`); [`XmppSender::send`] takes them back.
//! - Replies are plain-text bodies ([`body`]) kept inert by layout; edits
//!   are XEP-0308 corrections.
//! - The connection task keeps the session alive (XEP-0199 pings), and on
//!   loss reconnects with jittered exponential backoff and rejoins.
//!
//! See `docs/chat/xmpp.md` for setup.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fleetcmd_core::crypto::Secret;
use serde::Deserialize;
use tokio::sync::{Mutex, Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{AdapterError, BoxFuture, ChatAdapter, ChatSender, Incoming, MessageRef, Reply};

pub mod body;
pub mod client;
pub mod jid;
pub mod rooms;
pub mod sasl;
pub mod stanza;
pub mod xml;

use client::{ClientError, ClientOptions, Connection, TlsMode, Writer};
use jid::Jid;
use rooms::{Action, Rooms};
use stanza::{IqKind, Stanza};

/// The channel-name prefix of this adapter.
pub const SCHEME: &str = "xmpp:";
/// Default client port (RFC 6120).
pub const DEFAULT_PORT: u16 = 5222;
/// Default direct-TLS port (XEP-0368).
pub const DEFAULT_DIRECT_TLS_PORT: u16 = 5223;
/// How long `send` waits for the connection (and the room join) to be
/// back before it gives up.
pub const SEND_WAIT: Duration = Duration::from_secs(15);
/// Longest single write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages handed to the router and not yet taken. When full, the
/// connection task waits (backpressure on the XMPP stream).
const INCOMING_QUEUE: usize = 64;
/// Outgoing message rate: a burst of this many, then [`SEND_RATE_PER_SEC`].
const SEND_BURST: f64 = 10.0;
const SEND_RATE_PER_SEC: f64 = 5.0;
/// Reconnect backoff (the shape of ARCHITECTURE.md invariant 1): 1 s × 1.6ⁿ, ±20 %, capped.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Defaults, in one place.
pub mod defaults {
    pub const NICK: &str = "fleetcmd";
    pub const RESOURCE: &str = "fleetcmd";
    pub const KEEPALIVE_SECS: u64 = 60;
    pub const MAX_STANZA_BYTES: usize = super::xml::DEFAULT_MAX_STANZA;

    pub(super) fn nick() -> String {
        NICK.to_string()
    }
    pub(super) fn keepalive_secs() -> u64 {
        KEEPALIVE_SECS
    }
    pub(super) fn max_stanza_bytes() -> usize {
        MAX_STANZA_BYTES
    }
}

/// A password given inline in the config; printed as `[redacted]`.
#[derive(Clone, Debug)]
pub struct Password(pub Secret<String>);

impl PartialEq for Password {
    fn eq(&self, other: &Password) -> bool {
        self.0.expose() == other.0.expose()
    }
}
impl Eq for Password {}

impl<'de> Deserialize<'de> for Password {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Password, D::Error> {
        String::deserialize(d).map(|s| Password(Secret::new(s)))
    }
}

/// `[xmpp]` in gateway.toml.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct XmppConfig {
    /// The bot's account, `bot@example.com` (optionally `/resource`).
    pub jid: String,
    /// The password inline, or
    #[serde(default)]
    pub password: Option<Password>,
    /// a file holding it (read at start; a trailing newline is ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Server to connect to; default: the JID's domain.
    #[serde(default)]
    pub host: Option<String>,
    /// Default 5222 (5223 with `tls = "direct"`).
    #[serde(default)]
    pub port: Option<u16>,
    /// Rooms to join, as bare JIDs (`ops@conference.example.com`).
    #[serde(default)]
    pub rooms: Vec<String>,
    /// Nickname in the rooms (`_` is appended while it is taken).
    #[serde(default = "defaults::nick")]
    pub nick: String,
    /// `starttls` (default; `required` is the same), `direct`, or `none`
    /// (loopback only).
    #[serde(default)]
    pub tls: TlsMode,
    /// PEM CA certificate(s) to trust instead of the public roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Seconds between keepalive pings; twice this without any data from
    /// the server and the connection is considered dead.
    #[serde(default = "defaults::keepalive_secs")]
    pub keepalive_secs: u64,
    /// Largest stanza accepted from the server.
    #[serde(default = "defaults::max_stanza_bytes")]
    pub max_stanza_bytes: usize,
}

impl XmppConfig {
    /// A config with defaults for everything but the account.
    pub fn new(jid: &str, password: &str) -> XmppConfig {
        XmppConfig {
            jid: jid.to_string(),
            password: Some(Password(Secret::new(password.to_string()))),
            password_file: None,
            host: None,
            port: None,
            rooms: Vec::new(),
            nick: defaults::nick(),
            tls: TlsMode::default(),
            ca_file: None,
            keepalive_secs: defaults::KEEPALIVE_SECS,
            max_stanza_bytes: defaults::MAX_STANZA_BYTES,
        }
    }

    /// Every problem with the values, each with its key.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut bad = Vec::new();
        let mut domain = None;
        match Jid::parse(&self.jid) {
            Ok(j) if j.local.is_none() => {
                bad.push(("jid".into(), "must be an account, user@domain".into()))
            }
            Ok(j) => domain = Some(j.domain),
            Err(e) => bad.push(("jid".into(), e.to_string())),
        }
        match (&self.password, &self.password_file) {
            (Some(_), Some(_)) => bad.push((
                "password".into(),
                "give either password or password_file, not both".into(),
            )),
            (None, None) => bad.push((
                "password".into(),
                "password or password_file is required".into(),
            )),
            (Some(p), None) if p.0.expose().is_empty() => {
                bad.push(("password".into(), "must not be empty".into()))
            }
            (None, Some(f)) if f.as_os_str().is_empty() => {
                bad.push(("password_file".into(), "must name a file".into()))
            }
            _ => {}
        }
        if let Some(h) = &self.host
            && (h.is_empty() || h.chars().any(|c| c.is_whitespace() || c == '/'))
        {
            bad.push(("host".into(), "must be a host name or address".into()));
        }
        if self.port == Some(0) {
            bad.push(("port".into(), "must be 1..=65535".into()));
        }
        for (i, r) in self.rooms.iter().enumerate() {
            match Jid::parse(r) {
                Ok(j) if j.local.is_some() && j.is_bare() => {}
                Ok(_) => bad.push((
                    format!("rooms[{i}]"),
                    "must be a bare room JID, room@conference.example.com".into(),
                )),
                Err(e) => bad.push((format!("rooms[{i}]"), e.to_string())),
            }
        }
        if self.nick.trim().is_empty()
            || self.nick.len() > 1023
            || self.nick.chars().any(char::is_control)
        {
            bad.push((
                "nick".into(),
                "must be 1 to 1023 bytes without control characters".into(),
            ));
        }
        if self.tls == TlsMode::None {
            let host = self.host.clone().or(domain).unwrap_or_default();
            if !client::is_loopback_host(&host) {
                bad.push((
                    "tls".into(),
                    format!("\"none\" is only allowed to a loopback host, not {host:?}"),
                ));
            }
        }
        if self
            .ca_file
            .as_ref()
            .is_some_and(|f| f.as_os_str().is_empty())
        {
            bad.push(("ca_file".into(), "must name a file".into()));
        }
        if !(5..=3600).contains(&self.keepalive_secs) {
            bad.push(("keepalive_secs".into(), "must be 5..=3600".into()));
        }
        if !(4096..=16 * 1024 * 1024).contains(&self.max_stanza_bytes) {
            bad.push(("max_stanza_bytes".into(), "must be 4096..=16777216".into()));
        }
        bad
    }

    /// The account the chat's lease is named after (`crate::standby`): the
    /// bare JID. Gateways that give the bot different resources
    /// (`bot@example.com/gw1`, `/gw2`) are still one account: each
    /// resource is a session of its own, in every room under the same
    /// nick, and each session would run every command.
    pub fn lease_account(&self) -> String {
        match Jid::parse(&self.jid) {
            Ok(j) => j.bare().to_string(),
            Err(_) => self.jid.to_lowercase(),
        }
    }

    /// Validates, then reads the files the config names.
    pub fn client_options(&self) -> Result<ClientOptions, AdapterError> {
        let problems = self.validate();
        if !problems.is_empty() {
            return Err(platform(
                "xmpp config",
                problems
                    .iter()
                    .map(|(k, p)| format!("{k}: {p}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            ));
        }
        let full = Jid::parse(&self.jid).map_err(|e| platform("xmpp config", e.to_string()))?;
        let password = match (&self.password, &self.password_file) {
            (Some(p), _) => p.0.clone(),
            (None, Some(f)) => {
                let text = crate::secret::read_private(f).map_err(|source| AdapterError::Io {
                    what: format!("xmpp password_file {}", f.display()),
                    source,
                })?;
                let pw = text.trim_end_matches(['\n', '\r']).to_string();
                if pw.is_empty() {
                    return Err(platform(
                        "xmpp config",
                        format!("password_file {}: empty", f.display()),
                    ));
                }
                Secret::new(pw)
            }
            (None, None) => return Err(platform("xmpp config", "no password".into())),
        };
        let tls_config =
            client::tls_config(self.ca_file.as_deref()).map_err(|e| platform("xmpp ca_file", e))?;
        let port = self.port.unwrap_or(match self.tls {
            TlsMode::Direct => DEFAULT_DIRECT_TLS_PORT,
            _ => DEFAULT_PORT,
        });
        Ok(ClientOptions {
            host: self.host.clone().unwrap_or_else(|| full.domain.clone()),
            port,
            resource: full
                .resource
                .clone()
                .unwrap_or_else(|| defaults::RESOURCE.to_string()),
            jid: full.bare(),
            password,
            tls: self.tls,
            tls_config,
            max_stanza: self.max_stanza_bytes,
        })
    }
}

fn platform(what: &str, message: String) -> AdapterError {
    AdapterError::Platform {
        what: what.to_string(),
        message,
    }
}

fn client_error(e: ClientError) -> AdapterError {
    platform("xmpp", e.to_string())
}

/// Parses a channel (`xmpp:<bare-jid>`).
pub fn parse_channel(channel: &str) -> Result<Jid, AdapterError> {
    let jid = channel
        .strip_prefix(SCHEME)
        .ok_or_else(|| {
            platform(
                "xmpp channel",
                format!("{channel:?} does not start with xmpp:"),
            )
        })
        .and_then(|s| Jid::parse(s).map_err(|e| platform("xmpp channel", e.to_string())))?;
    if !jid.is_bare() || jid.local.is_none() {
        return Err(platform(
            "xmpp channel",
            format!("{channel:?} is not a bare user or room JID"),
        ));
    }
    Ok(jid)
}

/// State shared by the connection task and the senders.
struct Shared {
    /// `None` while disconnected.
    writer: Mutex<Option<Writer>>,
    /// Rooms joined in the current session.
    joined: std::sync::Mutex<BTreeSet<Jid>>,
    /// Signalled when `writer` or `joined` changes.
    changed: Notify,
}

impl Shared {
    fn is_joined(&self, room: &Jid) -> bool {
        self.joined
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(room)
    }

    fn set_joined(&self, rooms: Vec<Jid>) {
        let new: BTreeSet<Jid> = rooms.into_iter().collect();
        let mut j = self.joined.lock().unwrap_or_else(|p| p.into_inner());
        if *j != new {
            *j = new;
            drop(j);
            self.changed.notify_waiters();
        }
    }

    /// Writes now if connected; `Ok(false)` when not connected.
    async fn write_now(&self, xml: &str) -> Result<bool, ClientError> {
        let mut guard = self.writer.lock().await;
        let Some(w) = guard.as_mut() else {
            return Ok(false);
        };
        let r = match tokio::time::timeout(WRITE_TIMEOUT, w.send(xml)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout("writing to the server")),
        };
        if r.is_err() {
            *guard = None;
        }
        r.map(|()| true)
    }

    /// Writes once connected (and, for a room, joined), waiting up to
    /// [`SEND_WAIT`] for that.
    async fn write_when_ready(&self, xml: &str, room: Option<&Jid>) -> Result<(), AdapterError> {
        let deadline = Instant::now() + SEND_WAIT;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if room.is_none_or(|r| self.is_joined(r))
                && self.write_now(xml).await.map_err(client_error)?
            {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(platform(
                    "xmpp",
                    match room {
                        Some(r) => format!("not connected or not in room {r}; message dropped"),
                        None => "not connected; message dropped".to_string(),
                    },
                ));
            }
        }
    }
}

/// A token bucket for outgoing messages.
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The sending half.
pub struct XmppSender {
    shared: Arc<Shared>,
    rooms: BTreeSet<Jid>,
    bucket: Mutex<Bucket>,
}

impl XmppSender {
    async fn throttle(&self) {
        let mut b = self.bucket.lock().await;
        let now = Instant::now();
        b.tokens =
            (b.tokens + now.duration_since(b.at).as_secs_f64() * SEND_RATE_PER_SEC).min(SEND_BURST);
        b.at = now;
        if b.tokens < 1.0 {
            let wait = Duration::from_secs_f64((1.0 - b.tokens) / SEND_RATE_PER_SEC);
            // Holding the lock queues the other senders behind this one.
            tokio::time::sleep(wait).await;
            b.tokens = 1.0;
            b.at = Instant::now();
        }
        b.tokens -= 1.0;
    }

    async fn post(
        &self,
        channel: &str,
        reply: &Reply,
        replace: Option<&str>,
    ) -> Result<String, AdapterError> {
        let to = parse_channel(channel)?;
        let room = self.rooms.contains(&to);
        let id = stanza::new_id();
        let xml = stanza::message(
            &to,
            if room { "groupchat" } else { "chat" },
            &id,
            &body::render(reply),
            replace,
        );
        self.throttle().await;
        self.shared
            .write_when_ready(&xml, room.then_some(&to))
            .await?;
        Ok(id)
    }
}

impl ChatSender for XmppSender {
    fn send<'a>(
        &'a self,
        channel: &'a str,
        reply: Reply,
    ) -> BoxFuture<'a, Result<MessageRef, AdapterError>> {
        Box::pin(async move {
            let id = self.post(channel, &reply, None).await?;
            Ok(MessageRef {
                channel: channel.to_string(),
                id,
            })
        })
    }

    /// A XEP-0308 correction of the original message (clients show it in
    /// place of the original; each correction names the original's id).
    fn edit<'a>(
        &'a self,
        msg: &'a MessageRef,
        reply: Reply,
    ) -> BoxFuture<'a, Result<(), AdapterError>> {
        Box::pin(async move {
            self.post(&msg.channel, &reply, Some(&msg.id)).await?;
            Ok(())
        })
    }

    fn can_edit(&self) -> bool {
        true
    }
}

/// The XMPP adapter (receiving half). Dropping it stops the connection
/// (the socket closes, with no goodbye); [`XmppStop`] ends it cleanly.
pub struct XmppAdapter {
    rx: mpsc::Receiver<Incoming>,
    sender: Arc<XmppSender>,
    jid: Jid,
    task: JoinHandle<()>,
    stop: Arc<watch::Sender<bool>>,
}

/// Stops the adapter: closes the stream (`</stream:stream>`: the server
/// ends the session and takes the bot out of its rooms at once, as a
/// client logging out) and ends `recv`.
#[derive(Clone, Debug)]
pub struct XmppStop(Arc<watch::Sender<bool>>);

impl XmppStop {
    pub fn stop(&self) {
        self.0.send_replace(true);
    }
}

impl std::fmt::Debug for XmppAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XmppAdapter")
            .field("jid", &self.jid)
            .finish_non_exhaustive()
    }
}

impl Drop for XmppAdapter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl XmppAdapter {
    /// Validates `cfg`, connects and logs in (so a wrong password or an
    /// untrusted certificate fails here), then keeps the session running in
    /// a background task that joins the rooms and reconnects when needed.
    pub async fn connect(cfg: &XmppConfig) -> Result<XmppAdapter, AdapterError> {
        let opts = cfg.client_options()?;
        let rooms: Vec<Jid> = cfg
            .rooms
            .iter()
            .filter_map(|r| Jid::parse(r).ok())
            .collect();
        let first = Connection::connect(&opts).await.map_err(client_error)?;
        tracing::info!(jid = %first.jid, mechanism = first.mechanism, tls = first.tls, "xmpp connected");
        let shared = Arc::new(Shared {
            writer: Mutex::new(None),
            joined: std::sync::Mutex::new(BTreeSet::new()),
            changed: Notify::new(),
        });
        let (tx, rx) = mpsc::channel(INCOMING_QUEUE);
        let (stop, stopped) = watch::channel(false);
        let jid = opts.jid.clone();
        let run = Runner {
            shared: shared.clone(),
            opts,
            rooms: rooms.clone(),
            nick: cfg.nick.clone(),
            keepalive: Duration::from_secs(cfg.keepalive_secs),
            tx,
            stopped,
        };
        let task = tokio::spawn(run.run(first));
        Ok(XmppAdapter {
            rx,
            sender: Arc::new(XmppSender {
                shared,
                rooms: rooms.into_iter().collect(),
                bucket: Mutex::new(Bucket {
                    tokens: SEND_BURST,
                    at: Instant::now(),
                }),
            }),
            jid,
            task,
            stop: Arc::new(stop),
        })
    }

    /// What ends this adapter cleanly, from outside its `recv`.
    pub fn stop_handle(&self) -> XmppStop {
        XmppStop(self.stop.clone())
    }

    /// The bot's bare JID.
    pub fn jid(&self) -> &Jid {
        &self.jid
    }

    /// Rooms joined in the current session.
    pub fn joined_rooms(&self) -> Vec<Jid> {
        self.sender
            .shared
            .joined
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Waits until every room in `rooms` is joined, or `timeout` passes.
    pub async fn wait_joined(&self, rooms: &[Jid], timeout: Duration) -> bool {
        let shared = &self.sender.shared;
        let deadline = Instant::now() + timeout;
        loop {
            let notified = shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if rooms.iter().all(|r| shared.is_joined(&r.bare())) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }
}

impl ChatAdapter for XmppAdapter {
    async fn recv(&mut self) -> Option<Incoming> {
        self.rx.recv().await
    }

    fn sender(&self) -> Arc<dyn ChatSender> {
        self.sender.clone()
    }
}

/// The delay before reconnect attempt `n` (1-based): 1 s × 1.6ⁿ⁻¹ ± 20 %,
/// capped at [`BACKOFF_MAX`].
pub fn backoff(n: u32, jitter_unit: f64) -> Duration {
    crate::backoff::Backoff {
        first: BACKOFF_BASE,
        max: BACKOFF_MAX,
        ..crate::backoff::Backoff::RECONNECT
    }
    .delay_with(n.saturating_sub(1), jitter_unit)
}

/// Returns once [`XmppStop`] was used (never, if the adapter is gone).
async fn stop_asked(stopped: &mut watch::Receiver<bool>) {
    if stopped.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Why a session ended.
enum Ended {
    /// The adapter was dropped.
    ReceiverGone,
    /// [`XmppStop`]: the stream is closed.
    Stopped,
    Lost(ClientError),
}

/// The connection task.
struct Runner {
    shared: Arc<Shared>,
    opts: ClientOptions,
    rooms: Vec<Jid>,
    nick: String,
    keepalive: Duration,
    tx: mpsc::Sender<Incoming>,
    stopped: watch::Receiver<bool>,
}

impl Runner {
    /// Ends when the adapter is dropped or stopped; dropping `tx` then
    /// ends the adapter's `recv`.
    async fn run(self, first: Connection) {
        let mut next = Some(first);
        let mut failures = 0u32;
        loop {
            if *self.stopped.borrow() {
                return;
            }
            let conn = match next.take() {
                Some(c) => c,
                None => match Connection::connect(&self.opts).await {
                    Ok(c) => {
                        tracing::info!(jid = %c.jid, "xmpp reconnected");
                        c
                    }
                    Err(e) => {
                        failures += 1;
                        let wait = backoff(failures, crate::backoff::random_unit());
                        tracing::warn!(error = %e, attempt = failures, retry_in_ms = wait.as_millis() as u64, "xmpp connect failed");
                        self.pause(wait).await;
                        continue;
                    }
                },
            };
            failures = 0;
            let ended = self.session(conn).await;
            *self.shared.writer.lock().await = None;
            self.shared.set_joined(Vec::new());
            self.shared.changed.notify_waiters();
            match ended {
                Ended::ReceiverGone | Ended::Stopped => return,
                Ended::Lost(e) => {
                    failures += 1;
                    let wait = backoff(failures, crate::backoff::random_unit());
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "xmpp connection lost; reconnecting");
                    self.pause(wait).await;
                }
            }
        }
    }

    /// Sleeps `wait`, or less when the adapter is stopped meanwhile.
    async fn pause(&self, wait: Duration) {
        let mut stopped = self.stopped.clone();
        let _ = tokio::time::timeout(wait, stop_asked(&mut stopped)).await;
    }

    /// Closes the stream politely, then the connection; at most
    /// [`WRITE_TIMEOUT`], as a dead server may not take the bytes.
    async fn close(&self) {
        let writer = self.shared.writer.lock().await.take();
        if let Some(mut w) = writer {
            match tokio::time::timeout(WRITE_TIMEOUT, w.close()).await {
                Ok(Ok(())) => tracing::info!("xmpp stream closed"),
                Ok(Err(e)) => tracing::debug!(error = %e, "xmpp stream not closed cleanly"),
                Err(_) => tracing::debug!("xmpp stream not closed within the write timeout"),
            }
        }
    }

    async fn write(&self, xml: &str) -> Result<(), Ended> {
        match self.shared.write_now(xml).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(Ended::Lost(ClientError::Closed)),
            Err(e) => Err(Ended::Lost(e)),
        }
    }

    async fn session(&self, conn: Connection) -> Ended {
        let Connection {
            mut reader, writer, ..
        } = conn;
        *self.shared.writer.lock().await = Some(writer);
        self.shared.changed.notify_waiters();
        let mut rooms = Rooms::new(&self.opts.jid, &self.rooms, &self.nick);
        let mut setup = vec!["<presence/>".to_string()];
        setup.extend(rooms.join_all());
        for xml in setup {
            if let Err(e) = self.write(&xml).await {
                return e;
            }
        }
        let mut tick = tokio::time::interval_at(Instant::now() + self.keepalive, self.keepalive);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_rx = Instant::now();
        let mut stopped = self.stopped.clone();
        loop {
            tokio::select! {
                () = stop_asked(&mut stopped) => {
                    self.close().await;
                    return Ended::Stopped;
                }
                r = reader.next() => {
                    let el = match r {
                        Ok(el) => el,
                        Err(e) => return Ended::Lost(e),
                    };
                    last_rx = Instant::now();
                    if let Err(e) = self.handle(&mut rooms, el).await {
                        return e;
                    }
                }
                _ = tick.tick() => {
                    if last_rx.elapsed() > self.keepalive * 2 {
                        return Ended::Lost(ClientError::Timeout("waiting for the server (no answer to pings)"));
                    }
                    let mut out = vec![stanza::ping(&self.opts.jid.domain, &stanza::new_id())];
                    out.extend(rooms.rejoin_missing());
                    for xml in out {
                        if let Err(e) = self.write(&xml).await {
                            return e;
                        }
                    }
                }
            }
        }
    }

    async fn handle(&self, rooms: &mut Rooms, el: xml::Element) -> Result<(), Ended> {
        let st = match stanza::classify(&el) {
            Ok(s) => s,
            Err(why) => {
                tracing::warn!(stanza = %el.name, why, "malformed stanza ignored");
                return Ok(());
            }
        };
        if let Stanza::Iq(iq) = &st {
            if matches!(iq.kind, IqKind::Get | IqKind::Set) {
                self.write(&stanza::iq_answer(iq)).await?;
            }
            return Ok(());
        }
        for action in rooms.on_stanza(st) {
            match action {
                Action::Deliver(msg) => {
                    if self.tx.send(msg).await.is_err() {
                        return Err(Ended::ReceiverGone);
                    }
                }
                Action::Send(xml) => self.write(&xml).await?,
            }
        }
        self.shared.set_joined(rooms.joined());
        Ok(())
    }
}

impl crate::registry::Component for XmppConfig {
    const NAME: &'static str = "xmpp";
    const CHAT: bool = true;

    fn resolve_paths(&mut self, base: &std::path::Path) {
        for f in [&mut self.password_file, &mut self.ca_file]
            .into_iter()
            .flatten()
        {
            if f.is_relative() {
                *f = base.join(&*f);
            }
        }
    }

    fn validate(&self) -> Vec<(String, String)> {
        super::prefixed(Self::NAME, XmppConfig::validate(self))
    }

    /// Connected only while this gateway holds the lease of this account
    /// (`crate::standby`); a stop closes the stream.
    async fn build(self, cx: &mut crate::registry::BuildContext) -> Result<(), String> {
        let jid = self.lease_account();
        let cfg = Arc::new(self);
        let connect: crate::standby::ConnectFn<XmppAdapter> = Arc::new(move || {
            let cfg = cfg.clone();
            Box::pin(async move {
                let a = XmppAdapter::connect(&cfg).await?;
                let stop = a.stop_handle();
                Ok(crate::standby::Connected {
                    adapter: a,
                    stop: Some(Box::new(move || stop.stop())),
                })
            })
        });
        crate::standby::serve(cx, Self::NAME, &[&jid], connect).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(cfg: &XmppConfig) -> Vec<String> {
        cfg.validate().into_iter().map(|(k, _)| k).collect()
    }

    #[test]
    fn config_parses_and_validates_every_key() {
        let cfg: XmppConfig = toml::from_str(
            r#"
jid = "bot@example.com"
password_file = "/etc/fleetcmd/xmpp-password"
rooms = ["ops@conference.example.com"]
tls = "required"
"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.tls, TlsMode::StartTls);
        assert_eq!(cfg.nick, "fleetcmd");
        assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
        assert!(format!("{:?}", XmppConfig::new("a@b", "hunter2")).contains("[redacted]"));
        assert!(!format!("{:?}", XmppConfig::new("a@b", "hunter2")).contains("hunter2"));

        let unknown = toml::from_str::<XmppConfig>("jid = \"a@b\"\npasword = \"x\"");
        assert!(unknown.is_err());

        let mut bad = XmppConfig::new("not a jid", "");
        bad.host = Some("has space".into());
        bad.port = Some(0);
        bad.rooms = vec!["ops@conference.example.com/nick".into(), "@x".into()];
        bad.nick = " ".into();
        bad.tls = TlsMode::None;
        bad.keepalive_secs = 1;
        bad.max_stanza_bytes = 10;
        bad.ca_file = Some(PathBuf::new());
        assert_eq!(
            problems(&bad),
            [
                "jid",
                "password",
                "host",
                "port",
                "rooms[0]",
                "rooms[1]",
                "nick",
                "tls",
                "ca_file",
                "keepalive_secs",
                "max_stanza_bytes"
            ]
        );
        let mut both = XmppConfig::new("bot@localhost", "pw");
        both.password_file = Some("/x".into());
        assert_eq!(problems(&both), ["password"]);
        both.password = None;
        both.tls = TlsMode::None;
        assert!(problems(&both).is_empty(), "none is fine to localhost");
    }

    #[test]
    fn password_file_is_read_and_errors_name_it() {
        let dir = std::env::temp_dir().join(format!("fleetcmd-xmpp-{}", stanza::new_id()));
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join("pw");
        crate::secret::write_private(&file, "s3cret\n");
        let mut cfg = XmppConfig::new("bot@localhost", "x");
        cfg.password = None;
        cfg.password_file = Some(file.clone());
        let opts = cfg.client_options().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(opts.password.expose(), "s3cret");
        assert_eq!(
            (opts.host.as_str(), opts.port, opts.resource.as_str()),
            ("localhost", 5222, "fleetcmd")
        );
        cfg.password_file = Some(dir.join("missing"));
        let e = cfg
            .client_options()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("missing"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_lease_is_the_accounts_whatever_the_resource() {
        let account = |jid: &str| XmppConfig::new(jid, "pw").lease_account();
        // Found by the two-gateway test: `/gw1` and `/gw2` held two leases,
        // both joined the room and every command ran twice.
        for jid in [
            "bot@example.com",
            "bot@example.com/gw1",
            "Bot@Example.COM/gw2",
            "bot@example.com./fleetcmd",
        ] {
            assert_eq!(account(jid), "bot@example.com", "{jid}");
        }
        assert_ne!(account("bot@example.com"), account("bot2@example.com"));
    }

    #[test]
    fn channels_round_trip() {
        assert_eq!(
            parse_channel("xmpp:ops@conference.localhost")
                .map(|j| j.to_string())
                .ok(),
            Some("ops@conference.localhost".to_string())
        );
        for bad in [
            "ops@conference.localhost",
            "xmpp:ops@c/nick",
            "xmpp:localhost",
            "slack:T:C",
        ] {
            assert!(parse_channel(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_grows_with_jitter_and_a_cap() {
        assert_eq!(backoff(1, 0.5), Duration::from_secs(1));
        assert_eq!(backoff(1, 0.0), Duration::from_millis(800));
        assert_eq!(backoff(2, 1.0), Duration::from_secs_f64(1.6 * 1.2));
        assert_eq!(backoff(50, 0.5), BACKOFF_MAX);
    }
}
