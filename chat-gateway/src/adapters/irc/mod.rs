//! The IRC adapter: one connection (plain TCP or TLS) to one
//! network, registered under a nick (with alternatives when it is taken),
//! IRCv3 capabilities where offered (`message-tags`, `account-tag`, SASL
//! PLAIN), joined to the configured channels, kept alive with PING/PONG and
//! re-established with jittered exponential backoff. The adapter's `recv`
//! stream survives reconnects; replies queued while the link is down are
//! sent once it is back.
//!
//! Identities and channels (invariant 8 in ARCHITECTURE.md):
//! - a sender is `irc:<network>:<nick>!<user>@<host>`, or
//!   `irc:<network>:<account>` when the server tags the message with an
//!   IRCv3 `account` (only after `account-tag` was negotiated);
//! - a channel message comes from `irc:<network>:#chan` (lower-cased), a
//!   private message from `irc:<network>:<their nick>` with `direct = true`;
//!   `send` accepts both forms back;
//! - a `nick!user@host` identity is only as strong as its host part and
//!   ident (`~user` means the server got no identd answer, so anyone on
//!   that host can claim the user name): prefer accounts;
//! - a private reply carries who asked (its `thread`) and is sent only
//!   while the nick still belongs to the same `nick!user@host` and account
//!   (tracked through NICK, QUIT, `account-notify` and every message seen
//!   from the nick, forgotten on reconnect, and confirmed with `USERHOST`
//!   before each reply, since the server shows NICK and QUIT only in shared
//!   channels); otherwise it is dropped and logged.
//!
//! Output (invariant 11 in ARCHITECTURE.md) is rendered by [`render`] into inert lines, then
//! split so every relayed line fits in 512 bytes on UTF-8 boundaries, and
//! sent through one queue with a token bucket (flood control), so replies
//! keep their order and the server never disconnects the bot for flooding.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fleetcmd_core::crypto::Secret;
use serde::{Deserialize, Deserializer};
use tokio::sync::{mpsc, watch};
use tokio_rustls::rustls;

use super::{AdapterError, BoxFuture, ChatAdapter, ChatSender, Incoming, MessageRef, Reply};

mod conn;
pub mod proto;
pub mod render;

pub use conn::LinkStatus;
use conn::{Link, OutLine, Settings};
use render::RenderLimits;

/// Defaults of `[irc]`, in one place.
pub mod defaults {
    pub const TLS: bool = true;
    pub const PLAIN_PORT: u16 = 6667;
    pub const TLS_PORT: u16 = 6697;
    pub const REALNAME: &str = "fleetcmd chat gateway";
    pub const BURST: u32 = 4;
    pub const INTERVAL_MS: u64 = 500;
    pub const MAX_OUTPUT_LINES: usize = 10;
    pub const MAX_FULL_OUTPUT_LINES: usize = 50;
    pub const MAX_REPLY_LINES: usize = 40;
    pub const PING_INTERVAL_MS: u64 = 60_000;
    pub const PING_TIMEOUT_MS: u64 = 30_000;
    pub const RECONNECT_MIN_MS: u64 = 1_000;
    pub const RECONNECT_MAX_MS: u64 = 60_000;
    pub const REJOIN_DELAY_MS: u64 = 5_000;

    pub(super) fn tls() -> bool {
        TLS
    }
    pub(super) fn realname() -> String {
        REALNAME.to_string()
    }
    pub(super) fn burst() -> u32 {
        BURST
    }
    pub(super) fn interval_ms() -> u64 {
        INTERVAL_MS
    }
    pub(super) fn max_output_lines() -> usize {
        MAX_OUTPUT_LINES
    }
    pub(super) fn max_full_output_lines() -> usize {
        MAX_FULL_OUTPUT_LINES
    }
    pub(super) fn max_reply_lines() -> usize {
        MAX_REPLY_LINES
    }
    pub(super) fn ping_interval_ms() -> u64 {
        PING_INTERVAL_MS
    }
    pub(super) fn ping_timeout_ms() -> u64 {
        PING_TIMEOUT_MS
    }
    pub(super) fn reconnect_min_ms() -> u64 {
        RECONNECT_MIN_MS
    }
    pub(super) fn reconnect_max_ms() -> u64 {
        RECONNECT_MAX_MS
    }
    pub(super) fn rejoin_delay_ms() -> u64 {
        REJOIN_DELAY_MS
    }
}

/// Replies waiting for the connection; when full, `send` waits (up to
/// [`SEND_TIMEOUT`]) — backpressure on the command tasks, never a drop.
const OUT_QUEUE: usize = 64;
/// Messages received but not yet taken by `recv`; when full (the gateway
/// is far behind), new messages are dropped with a warning rather than
/// stalling the connection, which must keep answering PINGs.
const IN_QUEUE: usize = 256;
/// How long the router waits for a job's result before acknowledging it:
/// most single-host commands finish well within it, and a person hardly
/// notices the wait.
const ACK_GRACE: Duration = Duration::from_millis(300);
/// How long `send` waits for room in the outgoing queue.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);

fn secret_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret<String>>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.map(Secret::new))
}

/// `[irc]` in `gateway.toml`; every key is documented in `docs/chat/irc.md`.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct IrcConfig {
    /// Host name (or IP) of the IRC server; also the TLS server name.
    pub server: String,
    /// Default 6697 with TLS, 6667 without.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default = "defaults::tls")]
    pub tls: bool,
    /// PEM CA certificate(s) to trust instead of the public Mozilla roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "secret_opt")]
    pub server_password: Option<Secret<String>>,
    #[serde(default)]
    pub server_password_file: Option<PathBuf>,
    pub nick: String,
    #[serde(default)]
    pub alt_nicks: Vec<String>,
    /// Default: the nick.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default = "defaults::realname")]
    pub realname: String,
    /// The network's name in identities and channels (`irc:<network>:…`).
    pub network: String,
    #[serde(default)]
    pub channels: Vec<String>,
    #[serde(default)]
    pub sasl_account: Option<String>,
    #[serde(default, deserialize_with = "secret_opt")]
    pub sasl_password: Option<Secret<String>>,
    #[serde(default)]
    pub sasl_password_file: Option<PathBuf>,
    #[serde(default = "defaults::burst")]
    pub burst: u32,
    #[serde(default = "defaults::interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "defaults::max_output_lines")]
    pub max_output_lines: usize,
    #[serde(default = "defaults::max_full_output_lines")]
    pub max_full_output_lines: usize,
    #[serde(default = "defaults::max_reply_lines")]
    pub max_reply_lines: usize,
    #[serde(default = "defaults::ping_interval_ms")]
    pub ping_interval_ms: u64,
    #[serde(default = "defaults::ping_timeout_ms")]
    pub ping_timeout_ms: u64,
    #[serde(default = "defaults::reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    #[serde(default = "defaults::reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    #[serde(default = "defaults::rejoin_delay_ms")]
    pub rejoin_delay_ms: u64,
}

impl PartialEq for IrcConfig {
    fn eq(&self, other: &IrcConfig) -> bool {
        fn secret(a: &Option<Secret<String>>, b: &Option<Secret<String>>) -> bool {
            a.as_ref().map(Secret::expose) == b.as_ref().map(Secret::expose)
        }
        // Destructured so a new field cannot be forgotten here.
        let IrcConfig {
            server,
            port,
            tls,
            ca_file,
            server_password,
            server_password_file,
            nick,
            alt_nicks,
            username,
            realname,
            network,
            channels,
            sasl_account,
            sasl_password,
            sasl_password_file,
            burst,
            interval_ms,
            max_output_lines,
            max_full_output_lines,
            max_reply_lines,
            ping_interval_ms,
            ping_timeout_ms,
            reconnect_min_ms,
            reconnect_max_ms,
            rejoin_delay_ms,
        } = self;
        *server == other.server
            && *port == other.port
            && *tls == other.tls
            && *ca_file == other.ca_file
            && secret(server_password, &other.server_password)
            && *server_password_file == other.server_password_file
            && *nick == other.nick
            && *alt_nicks == other.alt_nicks
            && *username == other.username
            && *realname == other.realname
            && *network == other.network
            && *channels == other.channels
            && *sasl_account == other.sasl_account
            && secret(sasl_password, &other.sasl_password)
            && *sasl_password_file == other.sasl_password_file
            && *burst == other.burst
            && *interval_ms == other.interval_ms
            && *max_output_lines == other.max_output_lines
            && *max_full_output_lines == other.max_full_output_lines
            && *max_reply_lines == other.max_reply_lines
            && *ping_interval_ms == other.ping_interval_ms
            && *ping_timeout_ms == other.ping_timeout_ms
            && *reconnect_min_ms == other.reconnect_min_ms
            && *reconnect_max_ms == other.reconnect_max_ms
            && *rejoin_delay_ms == other.rejoin_delay_ms
    }
}

impl Eq for IrcConfig {}

/// Whether `s` is a nick servers accept (RFC 2812 shape, any length up to 32).
fn valid_nick(s: &str) -> bool {
    let special = |c: char| "[]\\`_^{|}".contains(c);
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || special(c))
        && chars.all(|c| c.is_ascii_alphanumeric() || special(c) || c == '-')
        && s.len() <= 32
}

fn valid_channel(s: &str) -> bool {
    s.starts_with(['#', '&', '+', '!']) && s.len() > 1 && s.len() <= 50 && proto::is_plain_param(s)
}

impl IrcConfig {
    /// Every problem with its key (`irc.<key>`), all at once.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        let mut bad = |key: &str, msg: String| p.push((format!("irc.{key}"), msg));
        if self.server.is_empty() || self.server.contains(char::is_whitespace) {
            bad("server", "must be a host name or IP address".into());
        }
        if self.port == Some(0) {
            bad("port", "must be 1..=65535".into());
        }
        if self.ca_file.is_some() && !self.tls {
            bad("ca_file", "is only used with tls = true".into());
        }
        if self.server_password.is_some() && self.server_password_file.is_some() {
            bad(
                "server_password",
                "give server_password or server_password_file, not both".into(),
            );
        }
        if !valid_nick(&self.nick) {
            bad(
                "nick",
                format!(
                    "{:?} is not a valid IRC nick (a letter or []\\`_^{{|}} first, then letters, digits, those or -; at most 32)",
                    self.nick
                ),
            );
        }
        for (i, n) in self.alt_nicks.iter().enumerate() {
            if !valid_nick(n) {
                bad(
                    &format!("alt_nicks[{i}]"),
                    format!("{n:?} is not a valid IRC nick"),
                );
            }
        }
        if let Some(u) = &self.username
            && (u.is_empty()
                || u.len() > 32
                || u.chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '@' || c == '!'))
        {
            bad(
                "username",
                "must be 1..=32 characters without spaces, @ or !".into(),
            );
        }
        if self.realname.chars().any(|c| c.is_control()) {
            bad("realname", "must not contain control characters".into());
        }
        if self.network.is_empty()
            || self
                .network
                .chars()
                .any(|c| c == ':' || c.is_whitespace() || c.is_control())
        {
            bad(
                "network",
                "must be a non-empty name without ':' or spaces (it is part of identities)".into(),
            );
        }
        for (i, c) in self.channels.iter().enumerate() {
            if !valid_channel(c) {
                bad(
                    &format!("channels[{i}]"),
                    format!("{c:?} is not a channel name like #ops (no spaces or commas)"),
                );
            }
        }
        let has_sasl_password = self.sasl_password.is_some() || self.sasl_password_file.is_some();
        if self.sasl_password.is_some() && self.sasl_password_file.is_some() {
            bad(
                "sasl_password",
                "give sasl_password or sasl_password_file, not both".into(),
            );
        }
        match (&self.sasl_account, has_sasl_password) {
            (Some(a), _) if a.is_empty() || a.contains('\0') => {
                bad("sasl_account", "must not be empty".into());
            }
            (Some(_), false) => bad(
                "sasl_account",
                "needs sasl_password or sasl_password_file".into(),
            ),
            (None, true) => bad("sasl_password", "needs sasl_account".into()),
            _ => {}
        }
        if self.burst == 0 {
            bad("burst", "must be at least 1".into());
        }
        if self.interval_ms < 50 {
            bad(
                "interval_ms",
                "must be at least 50 (servers disconnect floods)".into(),
            );
        }
        for (key, v) in [
            ("max_output_lines", self.max_output_lines),
            ("max_full_output_lines", self.max_full_output_lines),
        ] {
            if v == 0 {
                bad(key, "must be at least 1".into());
            }
        }
        if self.max_reply_lines < 2 {
            bad("max_reply_lines", "must be at least 2".into());
        }
        for (key, v) in [
            ("ping_interval_ms", self.ping_interval_ms),
            ("ping_timeout_ms", self.ping_timeout_ms),
            ("reconnect_min_ms", self.reconnect_min_ms),
        ] {
            if v < 10 {
                bad(key, "must be at least 10".into());
            }
        }
        if self.reconnect_max_ms < self.reconnect_min_ms {
            bad(
                "reconnect_max_ms",
                "must not be less than reconnect_min_ms".into(),
            );
        }
        p
    }

    /// Resolves relative `ca_file` and `*_file` paths against `dir` (the
    /// directory of the config file).
    pub fn resolve_paths(&mut self, dir: &Path) {
        for p in [
            &mut self.ca_file,
            &mut self.server_password_file,
            &mut self.sasl_password_file,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
    }

    /// The port, defaulted by `tls`.
    pub fn effective_port(&self) -> u16 {
        self.port.unwrap_or(if self.tls {
            defaults::TLS_PORT
        } else {
            defaults::PLAIN_PORT
        })
    }

    fn render_limits(&self) -> RenderLimits {
        RenderLimits {
            max_output_lines: self.max_output_lines,
            max_full_output_lines: self.max_full_output_lines,
            max_reply_lines: self.max_reply_lines,
        }
    }
}

fn read_secret(
    inline: &Option<Secret<String>>,
    file: &Option<PathBuf>,
    key: &str,
) -> Result<Option<Secret<String>>, AdapterError> {
    if let Some(s) = inline {
        return Ok(Some(s.clone()));
    }
    let Some(path) = file else { return Ok(None) };
    let text = crate::secret::read_private(path).map_err(|source| AdapterError::Io {
        what: format!("irc.{key} {}", path.display()),
        source,
    })?;
    let value = text.trim_end_matches(['\r', '\n']).to_string();
    if value.is_empty() || value.contains(['\r', '\n', '\0']) {
        return Err(AdapterError::Platform {
            what: format!("irc.{key} {}", path.display()),
            message: "must hold one non-empty line".into(),
        });
    }
    Ok(Some(Secret::new(value)))
}

fn tls_config(cfg: &IrcConfig) -> Result<Arc<rustls::ClientConfig>, AdapterError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let mut roots = rustls::RootCertStore::empty();
    match &cfg.ca_file {
        Some(path) => {
            let what = || format!("irc.ca_file {}", path.display());
            let pem = std::fs::read(path).map_err(|source| AdapterError::Io {
                what: what(),
                source,
            })?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| AdapterError::Platform {
                    what: what(),
                    message: format!("not a PEM certificate: {e}"),
                })?;
                roots.add(cert).map_err(|e| AdapterError::Platform {
                    what: what(),
                    message: format!("unusable CA certificate: {e}"),
                })?;
            }
            if roots.is_empty() {
                return Err(AdapterError::Platform {
                    what: what(),
                    message: "holds no certificate".into(),
                });
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| AdapterError::Platform {
            what: "irc tls".into(),
            message: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The receiving half: messages from the connection task.
pub struct IrcAdapter {
    rx: mpsc::Receiver<Incoming>,
    sender: Arc<IrcSender>,
    status: watch::Receiver<LinkStatus>,
    stop: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for IrcAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IrcAdapter")
            .field("network", &self.sender.network)
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

impl Drop for IrcAdapter {
    fn drop(&mut self) {
        // The adapter owns the connection task.
        self.task.abort();
    }
}

/// Stops the adapter: sends QUIT, closes the connection, and ends `recv`.
#[derive(Clone, Debug)]
pub struct IrcStop(Arc<watch::Sender<bool>>);

impl IrcStop {
    pub fn stop(&self) {
        self.0.send_replace(true);
    }
}

impl IrcAdapter {
    /// Checks the TLS and secret files and starts the connection task; the
    /// connection itself is made in the background (and remade whenever it
    /// drops), so an unreachable server is logged and retried, not fatal.
    pub async fn connect(cfg: &IrcConfig) -> Result<IrcAdapter, AdapterError> {
        let problems = cfg.validate();
        if !problems.is_empty() {
            let list: Vec<String> = problems.iter().map(|(k, m)| format!("{k}: {m}")).collect();
            return Err(AdapterError::Platform {
                what: "irc config".into(),
                message: list.join("; "),
            });
        }
        let tls = if cfg.tls {
            let name =
                rustls::pki_types::ServerName::try_from(cfg.server.clone()).map_err(|e| {
                    AdapterError::Platform {
                        what: format!("irc.server {}", cfg.server),
                        message: format!("not a TLS server name: {e}"),
                    }
                })?;
            Some((tls_config(cfg)?, name))
        } else {
            None
        };
        let sasl = match &cfg.sasl_account {
            Some(account) => {
                read_secret(&cfg.sasl_password, &cfg.sasl_password_file, "sasl_password")?
                    .map(|pw| (account.clone(), pw))
            }
            None => None,
        };
        let settings = Settings {
            server: cfg.server.clone(),
            port: cfg.effective_port(),
            tls,
            password: read_secret(
                &cfg.server_password,
                &cfg.server_password_file,
                "server_password",
            )?,
            nick: cfg.nick.clone(),
            alt_nicks: cfg.alt_nicks.clone(),
            username: cfg.username.clone().unwrap_or_else(|| cfg.nick.clone()),
            realname: cfg.realname.clone(),
            network: cfg.network.clone(),
            channels: cfg.channels.clone(),
            sasl,
            burst: cfg.burst,
            interval: Duration::from_millis(cfg.interval_ms),
            ping_interval: Duration::from_millis(cfg.ping_interval_ms),
            ping_timeout: Duration::from_millis(cfg.ping_timeout_ms),
            reconnect_min: Duration::from_millis(cfg.reconnect_min_ms),
            reconnect_max: Duration::from_millis(cfg.reconnect_max_ms),
            rejoin_delay: Duration::from_millis(cfg.rejoin_delay_ms),
        };
        let (in_tx, rx) = mpsc::channel(IN_QUEUE);
        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
        let (status_tx, status) = watch::channel(LinkStatus::default());
        let (stop_tx, stop_rx) = watch::channel(false);
        let link = Link::new(Arc::new(settings), in_tx, out_rx, status_tx, stop_rx);
        let task = tokio::spawn(link.run());
        Ok(IrcAdapter {
            rx,
            sender: Arc::new(IrcSender {
                network: cfg.network.clone(),
                out_tx,
                limits: cfg.render_limits(),
                next_id: AtomicU64::new(1),
                next_batch: AtomicU64::new(1),
            }),
            status,
            stop: Arc::new(stop_tx),
            task,
        })
    }

    /// The connection's state (current nick, registrations so far).
    pub fn status(&self) -> watch::Receiver<LinkStatus> {
        self.status.clone()
    }

    /// A handle that stops the adapter from elsewhere (e.g. on SIGTERM).
    pub fn stop_handle(&self) -> IrcStop {
        IrcStop(self.stop.clone())
    }
}

impl ChatAdapter for IrcAdapter {
    async fn recv(&mut self) -> Option<Incoming> {
        self.rx.recv().await
    }

    fn sender(&self) -> Arc<dyn ChatSender> {
        self.sender.clone()
    }
}

/// The sending half: renders replies and queues their lines.
pub struct IrcSender {
    network: String,
    out_tx: mpsc::Sender<Vec<OutLine>>,
    limits: RenderLimits,
    next_id: AtomicU64,
    /// Numbers each reply's lines, so a private reply is checked as a whole.
    next_batch: AtomicU64,
}

impl IrcSender {
    /// The IRC target (`#chan` or a nick) of a channel string.
    fn target(&self, channel: &str) -> Result<String, AdapterError> {
        let bad = |message: &str| AdapterError::Platform {
            what: format!("irc channel {channel:?}"),
            message: message.to_string(),
        };
        let rest = channel
            .strip_prefix("irc:")
            .and_then(|r| r.strip_prefix(self.network.as_str()))
            .and_then(|r| r.strip_prefix(':'))
            .ok_or_else(|| bad(&format!("expected irc:{}:<#channel or nick>", self.network)))?;
        if !proto::is_plain_param(rest) {
            return Err(bad("not a channel or nick"));
        }
        Ok(rest.to_string())
    }

    async fn queue(&self, target: String, reply: &Reply) -> Result<(), AdapterError> {
        let batch = self.next_batch.fetch_add(1, Ordering::Relaxed);
        let batch: Vec<OutLine> = render::render(reply, self.limits)
            .into_iter()
            .map(|text| OutLine {
                target: target.clone(),
                text,
                expect: reply.thread.clone(),
                batch,
            })
            .collect();
        match tokio::time::timeout(SEND_TIMEOUT, self.out_tx.send(batch)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(AdapterError::Platform {
                what: "irc".into(),
                message: "the connection task has stopped".into(),
            }),
            Err(_) => Err(AdapterError::Platform {
                what: "irc".into(),
                message: format!(
                    "outgoing queue still full after {}s (connection down?)",
                    SEND_TIMEOUT.as_secs()
                ),
            }),
        }
    }
}

impl ChatSender for IrcSender {
    fn send<'a>(
        &'a self,
        channel: &'a str,
        reply: Reply,
    ) -> BoxFuture<'a, Result<MessageRef, AdapterError>> {
        Box::pin(async move {
            let target = self.target(channel)?;
            self.queue(target, &reply).await?;
            Ok(MessageRef {
                channel: channel.to_string(),
                id: self.next_id.fetch_add(1, Ordering::Relaxed).to_string(),
            })
        })
    }

    /// IRC has no edits: the new text is posted as a new message.
    fn edit<'a>(
        &'a self,
        msg: &'a MessageRef,
        reply: Reply,
    ) -> BoxFuture<'a, Result<(), AdapterError>> {
        Box::pin(async move {
            let target = self.target(&msg.channel)?;
            self.queue(target, &reply).await
        })
    }

    fn can_edit(&self) -> bool {
        false
    }

    /// A quick job's result replaces its acknowledgement (one line instead
    /// of two through the flood control).
    fn ack_grace(&self) -> Duration {
        ACK_GRACE
    }
}

impl crate::registry::Component for IrcConfig {
    const NAME: &'static str = "irc";
    const CHAT: bool = true;

    fn resolve_paths(&mut self, base: &Path) {
        IrcConfig::resolve_paths(self, base);
    }

    fn validate(&self) -> Vec<(String, String)> {
        IrcConfig::validate(self)
    }

    /// Connected only while this gateway holds the lease of the nick on
    /// this server (`crate::standby`); a stop says QUIT.
    async fn build(self, cx: &mut crate::registry::BuildContext) -> Result<(), String> {
        let account = [
            self.server.to_ascii_lowercase(),
            self.effective_port().to_string(),
            self.nick.to_ascii_lowercase(),
        ];
        let cfg = Arc::new(self);
        let connect: crate::standby::ConnectFn<IrcAdapter> = Arc::new(move || {
            let cfg = cfg.clone();
            Box::pin(async move {
                let a = IrcAdapter::connect(&cfg).await?;
                let stop = a.stop_handle();
                Ok(crate::standby::Connected {
                    adapter: a,
                    stop: Some(Box::new(move || stop.stop())),
                })
            })
        });
        let account: Vec<&str> = account.iter().map(String::as_str).collect();
        crate::standby::serve(cx, Self::NAME, &account, connect).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> IrcConfig {
        toml::from_str(
            r##"
server = "irc.example.net"
nick = "fleetcmd"
network = "example"
channels = ["#ops"]
"##,
        )
        .expect("minimal config parses")
    }

    #[test]
    fn defaults_and_secrets_are_redacted() {
        let mut c: IrcConfig = toml::from_str(
            r##"
server = "irc.example.net"
nick = "fleetcmd"
network = "example"
server_password = "hunter2"
sasl_account = "bot"
sasl_password = "s3cret"
"##,
        )
        .expect("config parses");
        assert!(c.tls);
        assert_eq!(c.effective_port(), 6697);
        assert_eq!((c.burst, c.interval_ms, c.max_output_lines), (4, 500, 10));
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cret"),
            "{shown}"
        );
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        c.tls = false;
        assert_eq!(c.effective_port(), 6667);
        assert_eq!(c, c.clone());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = toml::from_str::<IrcConfig>(
            "server = \"s\"\nnick = \"n\"\nnetwork = \"x\"\nnik = \"y\"",
        );
        assert!(e.is_err());
    }

    #[test]
    fn validate_names_every_bad_key() {
        let mut c = cfg();
        c.nick = "9bad nick".into();
        c.alt_nicks = vec!["ok_2".into(), "no!".into()];
        c.network = "a:b".into();
        c.channels = vec!["#ops".into(), "ops".into(), "#a,#b".into()];
        c.sasl_account = Some("bot".into());
        c.burst = 0;
        c.tls = false;
        c.ca_file = Some("/x".into());
        c.reconnect_max_ms = 1;
        let keys: Vec<String> = c.validate().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "irc.ca_file",
                "irc.nick",
                "irc.alt_nicks[1]",
                "irc.network",
                "irc.channels[1]",
                "irc.channels[2]",
                "irc.sasl_account",
                "irc.burst",
                "irc.reconnect_max_ms",
            ]
        );
    }

    #[test]
    fn relative_paths_resolve_against_the_config_dir() {
        let mut c = cfg();
        c.ca_file = Some("ca.pem".into());
        c.sasl_password_file = Some("/abs/pw".into());
        c.resolve_paths(Path::new("/etc/fleetcmd"));
        assert_eq!(
            c.ca_file.as_deref(),
            Some(Path::new("/etc/fleetcmd/ca.pem"))
        );
        assert_eq!(c.sasl_password_file.as_deref(), Some(Path::new("/abs/pw")));
    }

    #[test]
    fn targets_must_belong_to_this_network() {
        let (out_tx, _rx) = mpsc::channel(1);
        let s = IrcSender {
            network: "example".into(),
            out_tx,
            limits: cfg().render_limits(),
            next_id: AtomicU64::new(1),
            next_batch: AtomicU64::new(1),
        };
        assert_eq!(s.target("irc:example:#ops").ok().as_deref(), Some("#ops"));
        assert_eq!(s.target("irc:example:alice").ok().as_deref(), Some("alice"));
        for bad in [
            "irc:other:#ops",
            "irc:example:",
            "irc:examplex:#ops",
            "slack:T1:C1",
            "irc:example:#ops\r\nQUIT",
            "irc:example:#a,#b",
            "irc:example:a b",
        ] {
            assert!(s.target(bad).is_err(), "{bad}");
        }
    }
}
