//! The connection task: connect (TCP or TLS), register, negotiate caps,
//! join, read messages, write queued lines through the token bucket, keep
//! the link alive, and reconnect with backoff when it drops. One task owns
//! everything, so there are no locks: the adapter talks to it through
//! channels.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use fleetcmd_core::crypto::Secret;
use fleetcmd_core::ids::Identity;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_rustls::rustls;

use super::proto::{self, Message};
use super::render::CONTINUATION_PREFIX;
use crate::adapters::Incoming;

/// Time to open the TCP connection and finish the TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Time from connecting to the welcome (001).
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);
/// Time one write may take before the link counts as dead.
const WRITE_TIMEOUT: Duration = Duration::from_secs(15);
/// Time after the welcome we wait for our JOINs to be confirmed before
/// sending queued lines anyway.
const JOIN_WAIT: Duration = Duration::from_secs(5);
/// Nicks tried before giving up on this connection (and reconnecting later).
const MAX_NICK_ATTEMPTS: usize = 30;
/// Outgoing messages held while the link is down; `send` waits beyond this.
const MAX_PENDING: usize = 2_000;
/// Nick length servers are guaranteed to accept (RFC 2812).
const RFC_NICK_LEN: usize = 9;
/// Bytes of the base64 SASL payload per AUTHENTICATE line.
const SASL_CHUNK: usize = 400;

/// What the connection task was configured with (secrets already read).
#[derive(Debug)]
pub(super) struct Settings {
    pub server: String,
    pub port: u16,
    pub tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
    pub password: Option<Secret<String>>,
    pub nick: String,
    pub alt_nicks: Vec<String>,
    pub username: String,
    pub realname: String,
    pub network: String,
    pub channels: Vec<String>,
    pub sasl: Option<(String, Secret<String>)>,
    pub burst: u32,
    pub interval: Duration,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub rejoin_delay: Duration,
}

/// One message text for one target, not yet split to the line limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct OutLine {
    pub target: String,
    pub text: String,
    /// For a private reply: who asked ([`peer_token`] of the request). The
    /// line is sent only while the nick still stands for that same person;
    /// else it is dropped (logged), so a reply never reaches whoever took
    /// the nick since.
    pub expect: Option<String>,
    /// The reply this line belongs to (lines of one reply share it).
    pub batch: u64,
}

/// Between lines merged into one message.
pub(super) const MERGE_SEPARATOR: &str = " ‖ ";

/// `first` with the lines after it in `pending` appended (each whole,
/// after [`MERGE_SEPARATOR`], in order) while they go to the same target,
/// are not private replies (those are checked per reply) and the text
/// stays within `budget` bytes. Each merged line keeps its own text, so a
/// reply still names who asked; the message starts with `first`, which is
/// inert, so the merged text cannot address a bot either.
pub(super) fn coalesce(
    mut first: OutLine,
    pending: &mut VecDeque<OutLine>,
    budget: usize,
) -> OutLine {
    if first.expect.is_some() {
        return first;
    }
    while let Some(next) = pending.front() {
        let fits = first.text.len() + MERGE_SEPARATOR.len() + next.text.len() <= budget;
        if next.target != first.target || next.expect.is_some() || !fits {
            break;
        }
        let next = pending.pop_front().expect("front was just seen");
        first.text.push_str(MERGE_SEPARATOR);
        first.text.push_str(&next.text);
    }
    first
}

/// Who holds a nick, as precisely as the server tells us: the full
/// `nick!user@host`, plus the IRCv3 account when one was tagged.
pub(super) fn peer_token(nick: &str, user: &str, host: &str, account: Option<&str>) -> String {
    let mut t = format!("{}!{user}@{host}", irc_lower(nick));
    if let Some(a) = account {
        t.push_str(" account=");
        t.push_str(a);
    }
    t
}

/// Nicks remembered with the identity that last messaged us privately.
const MAX_PEERS: usize = 4096;
/// A nick's holder confirmed by USERHOST is trusted this long for the
/// following lines of the same reply; each reply is checked anew.
const VERIFIED_FOR: Duration = Duration::from_secs(2);
/// How long to wait for the USERHOST answer before dropping the reply.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// What the connection is doing, for callers that want to wait for it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkStatus {
    /// Our nick while registered, `None` while disconnected.
    pub nick: Option<String>,
    /// Registrations so far (1 after the first connection, 2 after a reconnect…).
    pub registrations: u64,
    /// Configured channels we are in right now.
    pub joined: Vec<String>,
}

/// RFC 1459 case mapping: ASCII lower case plus `[]\~` ≡ `{}|^`.
pub(super) fn irc_lower(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '[' => '{',
            ']' => '}',
            '\\' => '|',
            '~' => '^',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

fn same_nick(a: &str, b: &str) -> bool {
    irc_lower(a) == irc_lower(b)
}

/// gRPC connection-backoff shape (as the agents use): min × 1.6ⁿ, capped
/// at max, ±20 % jitter, so a restarted server is not hit by every client
/// at once.
pub(super) fn backoff(attempt: u32, min: Duration, max: Duration) -> Duration {
    crate::backoff::Backoff {
        first: min,
        max,
        ..crate::backoff::Backoff::RECONNECT
    }
    .delay(attempt)
}

/// Token bucket: `burst` lines at once, then one per `interval`.
#[derive(Debug)]
pub(super) struct Bucket {
    tokens: f64,
    burst: f64,
    interval: Duration,
    last: Instant,
}

impl Bucket {
    pub(super) fn new(burst: u32, interval: Duration, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(burst),
            burst: f64::from(burst),
            interval,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt / self.interval.as_secs_f64()).min(self.burst);
    }

    /// When the next line may go.
    pub(super) fn ready_at(&mut self, now: Instant) -> Instant {
        self.refill(now);
        if self.tokens >= 1.0 {
            now
        } else {
            now + self.interval.mul_f64(1.0 - self.tokens)
        }
    }

    /// Lines that may go right now without waiting.
    pub(super) fn available(&mut self, now: Instant) -> usize {
        self.refill(now);
        self.tokens.max(0.0) as usize
    }

    /// Uses one token (call when a line is written).
    pub(super) fn take(&mut self, now: Instant) {
        self.refill(now);
        self.tokens -= 1.0;
    }
}

/// The facts `incoming` needs about the connection.
pub(super) struct Ctx<'a> {
    pub network: &'a str,
    pub nick: &'a str,
    pub chantypes: &'a str,
    /// `account-tag` was negotiated, so an `account` tag comes from the server.
    pub account_tag: bool,
}

/// The IRCv3 account the server tagged `msg` with (only once `account-tag`
/// was negotiated, so the tag comes from the server).
fn account_of<'m>(msg: &'m Message, ctx: &Ctx<'_>) -> Option<&'m str> {
    match msg.tag("account") {
        Some(Some(a)) if ctx.account_tag && a != "*" => Some(a),
        _ => None,
    }
}

/// The [`Incoming`] a PRIVMSG stands for: `Ok(None)` when it is not for the
/// router (CTCP, a target that is neither a channel nor us), `Err` when it
/// is malformed.
pub(super) fn incoming(msg: &Message, ctx: &Ctx<'_>) -> Result<Option<Incoming>, String> {
    if msg.params.len() < 2 {
        return Err("PRIVMSG without target and text".into());
    }
    let (target, text) = (msg.param(0), msg.param(1));
    if text.starts_with('\x01') {
        return Ok(None); // CTCP (ACTION, VERSION…), never a command
    }
    let Some(src) = &msg.source else {
        return Err("PRIVMSG without a source".into());
    };
    let (Some(user), Some(host)) = (&src.user, &src.host) else {
        return Err(format!("PRIVMSG from {:?} without user@host", src.nick));
    };
    let (channel, direct) = if target.starts_with(|c| ctx.chantypes.contains(c)) {
        (format!("irc:{}:{}", ctx.network, irc_lower(target)), false)
    } else if same_nick(target, ctx.nick) {
        (format!("irc:{}:{}", ctx.network, src.nick), true)
    } else {
        return Ok(None);
    };
    let hostmask = || Identity::parse(&format!("irc:{}:{}!{user}@{host}", ctx.network, src.nick));
    let identity = match msg.tag("account") {
        Some(Some(account)) if ctx.account_tag && account != "*" => {
            match Identity::parse(&format!("irc:{}:{account}", ctx.network)) {
                Ok(id) => id,
                Err(e) => {
                    tracing::warn!(error = %e, "unusable account tag; using the hostmask");
                    hostmask().map_err(|e| e.to_string())?
                }
            }
        }
        _ => hostmask().map_err(|e| e.to_string())?,
    };
    let from_bot = same_nick(&src.nick, ctx.nick)
        || msg.tag("bot").is_some()
        || msg.tag("draft/bot").is_some();
    // A private message's replies go back to the nick; the thread carries
    // who asked, so they are sent only while the nick is still theirs.
    let thread = direct.then(|| peer_token(&src.nick, user, host, account_of(msg, ctx)));
    Ok(Some(Incoming {
        identity,
        channel,
        text: text.to_string(),
        thread,
        direct,
        from_bot,
    }))
}

/// The next nick to try after `tried` attempts: the configured one, the
/// alternatives, then `<nick>_1`, `<nick>_2`… (cut to 9 characters once
/// the server called a nick erroneous, i.e. too long).
pub(super) fn nick_candidate(s: &Settings, tried: usize, short: bool) -> String {
    if tried == 0 {
        return s.nick.clone();
    }
    if let Some(alt) = s.alt_nicks.get(tried - 1) {
        return alt.clone();
    }
    let n = tried - s.alt_nicks.len();
    let suffix = format!("_{n}");
    let base: String = if short {
        s.nick
            .chars()
            .take(RFC_NICK_LEN.saturating_sub(suffix.len()))
            .collect()
    } else {
        s.nick.clone()
    };
    format!("{base}{suffix}")
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Reads CRLF- (or LF-) terminated lines; cancel-safe (only `read` awaits),
/// bounded (an over-long line is dropped, not buffered).
struct LineReader<R> {
    r: R,
    buf: Vec<u8>,
    discarding: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    fn new(r: R) -> Self {
        LineReader {
            r,
            buf: Vec::with_capacity(1024),
            discarding: false,
        }
    }

    async fn next_line(&mut self) -> std::io::Result<Option<String>> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                if std::mem::take(&mut self.discarding) {
                    continue;
                }
                return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
            }
            if self.buf.len() > proto::MAX_RECV_LINE_BYTES {
                tracing::warn!(
                    bytes = self.buf.len(),
                    "irc: over-long line from the server dropped"
                );
                self.buf.clear();
                self.discarding = true;
            }
            let mut chunk = [0u8; 4096];
            let n = self.r.read(&mut chunk).await?;
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Why a session ended.
enum End {
    Stopped,
    Lost { registered: bool, reason: String },
}

/// Per-connection state.
struct Conn {
    reader: LineReader<tokio::io::ReadHalf<Box<dyn Stream>>>,
    writer: tokio::io::WriteHalf<Box<dyn Stream>>,
    nick: String,
    nick_attempts: usize,
    short_nicks: bool,
    registered: bool,
    /// Our `user` and `host` as others see them, once the server showed them.
    user: Option<String>,
    host: Option<String>,
    chantypes: String,
    cap_ls: Vec<String>,
    caps: HashSet<String>,
    cap_ended: bool,
    sasl_started: bool,
    joined: HashSet<String>,
    awaiting_join: HashSet<String>,
    join_deadline: Instant,
    rejoin: Vec<(String, Instant)>,
    bucket: Bucket,
    last_rx: Instant,
    ping_sent: Option<Instant>,
    started: Instant,
}

impl Conn {
    async fn write(&mut self, line: &str, secret: bool) -> Result<(), String> {
        // The last line of defence: nothing we send may break the line.
        let line: String = line
            .chars()
            .map(|c| {
                if matches!(c, '\r' | '\n' | '\0') {
                    ' '
                } else {
                    c
                }
            })
            .collect();
        if secret {
            tracing::debug!(
                command = line.split(' ').next().unwrap_or(""),
                "irc >> [redacted]"
            );
        } else {
            tracing::debug!(line = %line, "irc >>");
        }
        let data = format!("{line}\r\n");
        match timeout(WRITE_TIMEOUT, async {
            self.writer.write_all(data.as_bytes()).await?;
            self.writer.flush().await
        })
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("write failed: {e}")),
            Err(_) => Err(format!("write blocked for {}s", WRITE_TIMEOUT.as_secs())),
        }
    }

    async fn cap_end(&mut self) -> Result<(), String> {
        if self.cap_ended {
            return Ok(());
        }
        self.cap_ended = true;
        self.write("CAP END", false).await
    }

    fn ready(&self, now: Instant) -> bool {
        self.registered && (self.awaiting_join.is_empty() || now >= self.join_deadline)
    }

    fn status(&self, registrations: u64) -> LinkStatus {
        let mut joined: Vec<String> = self.joined.iter().cloned().collect();
        joined.sort();
        LinkStatus {
            nick: self.registered.then(|| self.nick.clone()),
            registrations,
            joined,
        }
    }
}

enum Event {
    Stop,
    Line(std::io::Result<Option<String>>),
    Batch(Option<Vec<OutLine>>),
    SendDue,
    Timer,
}

/// The connection task's state across connections.
pub(super) struct Link {
    s: Arc<Settings>,
    in_tx: mpsc::Sender<Incoming>,
    out_rx: mpsc::Receiver<Vec<OutLine>>,
    out_open: bool,
    pending: VecDeque<OutLine>,
    /// By lower-cased nick: [`peer_token`] of who last messaged us
    /// privately under it, forgotten when the nick changes hands (NICK,
    /// QUIT, another user@host or account seen under it) and on reconnect.
    peers: std::collections::HashMap<String, String>,
    /// A USERHOST sent to confirm who holds a nick before a private reply
    /// (the server tells us about NICK and QUIT only in shared channels):
    /// the lower-cased nick and when to give up. Sending waits for it.
    verifying: Option<(String, Instant)>,
    /// The last nick confirmed, for which reply, and when.
    verified: Option<(String, u64, Instant)>,
    /// The reply being verified (with `verifying`).
    verifying_batch: u64,
    status: watch::Sender<LinkStatus>,
    stop: watch::Receiver<bool>,
    registrations: u64,
    dropped_incoming: u64,
}

impl Link {
    pub(super) fn new(
        s: Arc<Settings>,
        in_tx: mpsc::Sender<Incoming>,
        out_rx: mpsc::Receiver<Vec<OutLine>>,
        status: watch::Sender<LinkStatus>,
        stop: watch::Receiver<bool>,
    ) -> Link {
        Link {
            s,
            in_tx,
            out_rx,
            out_open: true,
            pending: VecDeque::new(),
            peers: std::collections::HashMap::new(),
            verifying: None,
            verified: None,
            verifying_batch: 0,
            status,
            stop,
            registrations: 0,
            dropped_incoming: 0,
        }
    }

    /// Connects, and reconnects with backoff, until stopped.
    pub(super) async fn run(mut self) {
        let mut attempt = 0u32;
        loop {
            let end = self.session().await;
            let registrations = self.registrations;
            self.status.send_modify(|st| {
                st.nick = None;
                st.joined.clear();
                st.registrations = registrations;
            });
            match end {
                End::Stopped => {
                    tracing::info!(network = %self.s.network, "irc adapter stopped");
                    return;
                }
                End::Lost { registered, reason } => {
                    if registered {
                        attempt = 0;
                    }
                    let wait = backoff(attempt, self.s.reconnect_min, self.s.reconnect_max);
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(
                        network = %self.s.network,
                        server = %self.s.server,
                        reason = %reason,
                        retry_in_ms = wait.as_millis() as u64,
                        "irc connection lost"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.stop.wait_for(|s| *s) => return,
                    }
                }
            }
        }
    }

    async fn open(&self) -> std::io::Result<Box<dyn Stream>> {
        let tcp = TcpStream::connect((self.s.server.as_str(), self.s.port)).await?;
        let _ = tcp.set_nodelay(true);
        match &self.s.tls {
            None => Ok(Box::new(tcp)),
            Some((cfg, name)) => {
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name.clone(), tcp)
                    .await?;
                Ok(Box::new(tls))
            }
        }
    }

    async fn session(&mut self) -> End {
        let lost = |reason: String| End::Lost {
            registered: false,
            reason,
        };
        let stream = match timeout(CONNECT_TIMEOUT, self.open()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return lost(format!("connect to {}:{}: {e}", self.s.server, self.s.port));
            }
            Err(_) => {
                return lost(format!(
                    "connect to {}:{}: timed out",
                    self.s.server, self.s.port
                ));
            }
        };
        tracing::info!(server = %self.s.server, port = self.s.port, tls = self.s.tls.is_some(), "irc connected");
        let (r, w) = tokio::io::split(stream);
        let now = Instant::now();
        // Whoever held a nick may have left while we were away.
        self.peers.clear();
        self.verifying = None;
        self.verified = None;
        let mut c = Conn {
            reader: LineReader::new(r),
            writer: w,
            nick: self.s.nick.clone(),
            nick_attempts: 0,
            short_nicks: false,
            registered: false,
            user: None,
            host: None,
            chantypes: "#&".into(),
            cap_ls: Vec::new(),
            caps: HashSet::new(),
            cap_ended: false,
            sasl_started: false,
            joined: HashSet::new(),
            awaiting_join: HashSet::new(),
            join_deadline: now,
            rejoin: Vec::new(),
            bucket: Bucket::new(self.s.burst, self.s.interval, now),
            last_rx: now,
            ping_sent: None,
            started: now,
        };
        let end = self.drive(&mut c).await;
        if let Err(reason) = end {
            return End::Lost {
                registered: c.registered,
                reason,
            };
        }
        End::Stopped
    }

    /// Registers, then runs the connection until it fails (`Err`) or the
    /// adapter is stopped (`Ok`).
    async fn drive(&mut self, c: &mut Conn) -> Result<(), String> {
        c.write("CAP LS 302", false).await?;
        if let Some(pw) = &self.s.password {
            c.write(&format!("PASS :{}", pw.expose()), true).await?;
        }
        c.write(&format!("NICK {}", c.nick), false).await?;
        c.write(
            &format!("USER {} 0 * :{}", self.s.username, self.s.realname),
            false,
        )
        .await?;
        loop {
            let now = Instant::now();
            let send_at = if c.ready(now) && !self.pending.is_empty() && self.verifying.is_none() {
                Some(c.bucket.ready_at(now))
            } else {
                None
            };
            let timer = self.next_timer(c);
            let event = tokio::select! {
                biased;
                _ = self.stop.wait_for(|s| *s) => Event::Stop,
                line = c.reader.next_line() => Event::Line(line),
                _ = sleep_until(send_at.unwrap_or(now)), if send_at.is_some() => Event::SendDue,
                _ = sleep_until(timer) => Event::Timer,
                batch = self.out_rx.recv(), if self.out_open && self.pending.len() < MAX_PENDING => Event::Batch(batch),
            };
            match event {
                Event::Stop => {
                    let _ = c.write("QUIT :fleetcmd gateway stopping", false).await;
                    let _ = c.writer.shutdown().await;
                    return Ok(());
                }
                Event::Line(Ok(Some(line))) => {
                    c.last_rx = Instant::now();
                    c.ping_sent = None;
                    self.on_line(c, &line).await?;
                }
                Event::Line(Ok(None)) => return Err("the server closed the connection".into()),
                Event::Line(Err(e)) => return Err(format!("read failed: {e}")),
                Event::Batch(Some(batch)) => self.pending.extend(batch),
                Event::Batch(None) => self.out_open = false,
                Event::SendDue => self.send_one(c).await?,
                Event::Timer => self.on_timer(c).await?,
            }
        }
    }

    /// The earliest of: registration deadline, ping/pong deadline, rejoins.
    fn next_timer(&self, c: &Conn) -> Instant {
        let mut t = if !c.registered {
            c.started + REGISTER_TIMEOUT
        } else {
            match c.ping_sent {
                Some(sent) => sent + self.s.ping_timeout,
                None => c.last_rx + self.s.ping_interval,
            }
        };
        if let Some(r) = c.rejoin.iter().map(|(_, at)| *at).min() {
            t = t.min(r);
        }
        if let Some((_, give_up)) = &self.verifying {
            t = t.min(*give_up);
        }
        if c.registered && !c.awaiting_join.is_empty() && !self.pending.is_empty() {
            // Wake up when queued lines may go even without join confirmations.
            t = t.min(c.join_deadline);
        }
        t
    }

    async fn on_timer(&mut self, c: &mut Conn) -> Result<(), String> {
        let now = Instant::now();
        if let Some((nick, give_up)) = &self.verifying
            && now >= *give_up
        {
            tracing::warn!(%nick, "irc: no USERHOST answer; private replies to the nick dropped");
            self.peers.remove(nick);
            self.verifying = None;
        }
        if c.registered && now >= c.join_deadline && !c.awaiting_join.is_empty() {
            tracing::warn!(channels = ?c.awaiting_join, "irc: joins not confirmed; sending anyway");
            c.awaiting_join.clear();
        }
        if !c.registered && now >= c.started + REGISTER_TIMEOUT {
            return Err(format!(
                "not registered within {}s",
                REGISTER_TIMEOUT.as_secs()
            ));
        }
        if c.registered {
            match c.ping_sent {
                Some(sent) if now >= sent + self.s.ping_timeout => {
                    return Err(format!(
                        "no reply to our PING within {} ms; the link is dead",
                        self.s.ping_timeout.as_millis()
                    ));
                }
                None if now >= c.last_rx + self.s.ping_interval => {
                    c.ping_sent = Some(now);
                    c.write(&format!("PING :{}", self.s.nick), false).await?;
                }
                _ => {}
            }
        }
        let due: Vec<String> = c
            .rejoin
            .iter()
            .filter(|(_, at)| *at <= now)
            .map(|(ch, _)| ch.clone())
            .collect();
        if !due.is_empty() {
            c.rejoin.retain(|(_, at)| *at > now);
            for ch in due {
                tracing::info!(channel = %ch, "irc: rejoining");
                c.write(&format!("JOIN {ch}"), false).await?;
            }
        }
        Ok(())
    }

    /// Writes the next queued line (or its first piece, when too long).
    async fn send_one(&mut self, c: &mut Conn) -> Result<(), String> {
        let Some(line) = self.pending.pop_front() else {
            return Ok(());
        };
        if let Some(expect) = &line.expect
            && !line.target.starts_with(|ch| c.chantypes.contains(ch))
            && self.peers.get(&irc_lower(&line.target)) != Some(expect)
        {
            tracing::warn!(
                nick = %line.target,
                asked_by = %expect,
                now = %self.peers.get(&irc_lower(&line.target)).map_or("unknown", String::as_str),
                "irc: private reply dropped: the nick no longer belongs to who asked"
            );
            return Ok(());
        }
        if line.expect.is_some() && !line.target.starts_with(|ch| c.chantypes.contains(ch)) {
            let nick = irc_lower(&line.target);
            let now = Instant::now();
            let fresh = self.verified.as_ref().is_some_and(|(n, b, at)| {
                *n == nick && *b == line.batch && now.duration_since(*at) < VERIFIED_FOR
            });
            if !fresh {
                // Ask who holds the nick now; the line waits for the answer.
                c.write(&format!("USERHOST {}", line.target), false).await?;
                self.verifying = Some((nick, now + VERIFY_TIMEOUT));
                self.verifying_batch = line.batch;
                self.pending.push_front(line);
                return Ok(());
            }
        }
        let user = c
            .user
            .as_ref()
            .map_or(proto::WORST_CASE_USER_BYTES, String::len);
        let host = c
            .host
            .as_ref()
            .map_or(proto::WORST_CASE_HOST_BYTES, String::len);
        // A floor so a pathological nick or target still makes progress.
        let budget = proto::privmsg_text_budget(&c.nick, user, host, &line.target).max(64);
        // Other replies waiting behind this one, and more lines than the
        // flood control lets out now: merge the waiting lines to the same
        // target into fewer messages, so many users' replies are not held
        // back one line per interval. A reply alone keeps its lines.
        let now = Instant::now();
        let backlog = self.pending.len() >= c.bucket.available(now)
            && self.pending.iter().any(|l| l.batch != line.batch);
        let line = if backlog {
            coalesce(line, &mut self.pending, budget)
        } else {
            line
        };
        let (mut head, mut tail) = proto::split_at_boundary(&line.text, budget);
        // Servers strip trailing spaces: a piece must not end with one, or
        // it would be lost; the next piece starts with it instead.
        let trimmed = head.trim_end();
        if !tail.is_empty() && !trimmed.is_empty() {
            (head, tail) = line.text.split_at(trimmed.len());
        }
        if !tail.is_empty() {
            self.pending.push_front(OutLine {
                target: line.target.clone(),
                text: format!("{CONTINUATION_PREFIX}{tail}"),
                expect: line.expect.clone(),
                batch: line.batch,
            });
        }
        c.bucket.take(now);
        c.write(&format!("PRIVMSG {} :{head}", line.target), false)
            .await
    }

    async fn next_nick(&mut self, c: &mut Conn, why: &str) -> Result<(), String> {
        c.nick_attempts += 1;
        if c.nick_attempts >= MAX_NICK_ATTEMPTS {
            return Err(format!("no usable nick after {MAX_NICK_ATTEMPTS} tries"));
        }
        let next = nick_candidate(&self.s, c.nick_attempts, c.short_nicks);
        tracing::info!(refused = %c.nick, reason = why, next = %next, "irc: nick refused, trying another");
        c.nick = next;
        c.write(&format!("NICK {}", c.nick), false).await
    }

    async fn on_line(&mut self, c: &mut Conn, line: &str) -> Result<(), String> {
        let msg = match Message::parse(line) {
            Ok(m) => m,
            Err(proto::ParseError::Empty) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, line = %line.trim_end().chars().take(200).collect::<String>(), "irc: malformed line skipped");
                return Ok(());
            }
        };
        tracing::trace!(line = %line.trim_end(), "irc <<");
        self.track_peer(c, &msg);
        match msg.command.as_str() {
            "PING" => {
                let token = msg.params.last().map_or("", String::as_str);
                c.write(&format!("PONG :{token}"), false).await?;
            }
            "CAP" => self.on_cap(c, &msg).await?,
            "AUTHENTICATE" if msg.param(0) == "+" => {
                if let Some((account, pw)) = &self.s.sasl {
                    let payload = base64::engine::general_purpose::STANDARD
                        .encode(format!("\0{account}\0{}", pw.expose()));
                    let mut chunks: Vec<&str> = payload
                        .as_bytes()
                        .chunks(SASL_CHUNK)
                        .map(|ch| std::str::from_utf8(ch).unwrap_or(""))
                        .collect();
                    if payload.len() % SASL_CHUNK == 0 {
                        chunks.push("+");
                    }
                    for chunk in chunks {
                        c.write(&format!("AUTHENTICATE {chunk}"), true).await?;
                    }
                }
            }
            "903" => {
                tracing::info!("irc: SASL authentication succeeded");
                c.cap_end().await?;
            }
            "902" | "904" | "905" | "906" | "908" => {
                tracing::error!(numeric = %msg.command, text = %msg.params.last().map_or("", String::as_str), "irc: SASL authentication failed; continuing without an account");
                c.cap_end().await?;
            }
            "001" => self.on_welcome(c, &msg).await?,
            "005" => {
                for token in msg.params.iter().skip(1) {
                    if let Some(types) = token.strip_prefix("CHANTYPES=") {
                        c.chantypes = types.to_string();
                    }
                }
            }
            "432" | "433" | "436" | "437" if !c.registered => {
                if msg.command == "432" {
                    c.short_nicks = true;
                }
                let why = msg.params.last().cloned().unwrap_or_default();
                self.next_nick(c, &why).await?;
            }
            "464" | "465" => {
                return Err(format!(
                    "refused by the server ({}): {}",
                    msg.command,
                    msg.params.last().map_or("", String::as_str)
                ));
            }
            "ERROR" => {
                return Err(format!(
                    "server error: {}",
                    msg.params.last().map_or("", String::as_str)
                ));
            }
            "396" => c.host = Some(msg.param(1).to_string()),
            // RPL_USERHOST: `nick[*]=(+|-)user@host …`, the answer to a check
            // before a private reply.
            "302" => self.on_userhost(msg.params.last().map_or("", String::as_str)),
            "JOIN" if same_nick(msg.nick(), &c.nick) => {
                if let Some(src) = &msg.source {
                    c.user.clone_from(&src.user);
                    c.host.clone_from(&src.host);
                }
                let ch = irc_lower(msg.param(0));
                c.awaiting_join.remove(&ch);
                c.joined.insert(ch);
                tracing::info!(channel = %msg.param(0), "irc: joined");
                self.publish(c);
            }
            "KICK" if same_nick(msg.param(1), &c.nick) => {
                let ch = msg.param(0).to_string();
                tracing::warn!(channel = %ch, by = %msg.nick(), reason = %msg.param(2), "irc: kicked; rejoining later");
                self.left(c, &ch);
            }
            "PART" if same_nick(msg.nick(), &c.nick) => {
                let ch = msg.param(0).to_string();
                self.left(c, &ch);
            }
            "NICK" if same_nick(msg.nick(), &c.nick) => {
                c.nick = msg.param(0).to_string();
                self.publish(c);
            }
            "403" | "405" | "471" | "473" | "474" | "475" | "476" | "477" => {
                let ch = msg.param(1);
                tracing::warn!(channel = %ch, numeric = %msg.command, reason = %msg.params.last().map_or("", String::as_str), "irc: cannot join");
                c.awaiting_join.remove(&irc_lower(ch));
            }
            "404" => {
                tracing::warn!(target = %msg.param(1), reason = %msg.params.last().map_or("", String::as_str), "irc: message not delivered");
            }
            "PRIVMSG" => {
                let ctx = Ctx {
                    network: &self.s.network,
                    nick: &c.nick,
                    chantypes: &c.chantypes,
                    account_tag: c.caps.contains("account-tag"),
                };
                match incoming(&msg, &ctx) {
                    Ok(Some(m)) => self.deliver(m),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "irc: PRIVMSG skipped");
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Compares who holds the nick being verified with who asked: the same
    /// `user@host` confirms it (for [`VERIFIED_FOR`]); anything else, or
    /// the nick missing from the answer (gone), forgets the asker, so the
    /// waiting reply is dropped.
    fn on_userhost(&mut self, replies: &str) {
        let Some((nick, _)) = self.verifying.take() else {
            return;
        };
        let now_holds = replies.split_whitespace().find_map(|r| {
            let (n, rest) = r.split_once('=')?;
            (irc_lower(n.trim_end_matches('*')) == nick)
                .then(|| rest.trim_start_matches(['+', '-']).to_string())
        });
        let asked = self
            .peers
            .get(&nick)
            .and_then(|t| t.split(' ').next())
            .and_then(|m| m.split_once('!'))
            .map(|(_, uh)| uh.to_string());
        match (now_holds, asked) {
            (Some(holder), Some(asker)) if holder == asker => {
                self.verified = Some((nick, self.verifying_batch, Instant::now()));
            }
            (holder, _) => {
                tracing::warn!(%nick, now = ?holder, "irc: the nick changed hands since the private request");
                self.peers.remove(&nick);
            }
        }
    }

    /// Keeps [`Link::peers`] true: a private message records who sent it
    /// under their nick; anything showing the nick changed hands forgets it.
    fn track_peer(&mut self, c: &Conn, msg: &Message) {
        let Some(src) = &msg.source else { return };
        let nick = irc_lower(&src.nick);
        match msg.command.as_str() {
            "NICK" | "QUIT" => {
                self.peers.remove(&nick);
                if msg.command == "NICK" {
                    self.peers.remove(&irc_lower(msg.param(0)));
                }
                return;
            }
            // account-notify: the nick logged in or out.
            "ACCOUNT" => {
                self.peers.remove(&nick);
                return;
            }
            _ => {}
        }
        let (Some(user), Some(host)) = (&src.user, &src.host) else {
            return;
        };
        let ctx = Ctx {
            network: &self.s.network,
            nick: &c.nick,
            chantypes: &c.chantypes,
            account_tag: c.caps.contains("account-tag"),
        };
        let direct =
            msg.command == "PRIVMSG" && msg.params.len() >= 2 && same_nick(msg.param(0), &c.nick);
        if direct {
            let token = peer_token(&src.nick, user, host, account_of(msg, &ctx));
            if self.peers.len() >= MAX_PEERS
                && !self.peers.contains_key(&nick)
                && let Some(k) = self.peers.keys().next().cloned()
            {
                self.peers.remove(&k);
            }
            self.peers.insert(nick, token);
        } else if let Some(known) = self.peers.get(&nick) {
            // Compared without the account: only PRIVMSG is sure to carry it.
            let mask = peer_token(&src.nick, user, host, None);
            if known.split(' ').next() != Some(mask.as_str()) {
                self.peers.remove(&nick);
            }
        }
    }

    fn deliver(&mut self, m: Incoming) {
        match self.in_tx.try_send(m) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(m)) => {
                self.dropped_incoming += 1;
                tracing::warn!(identity = %m.identity.as_str(), channel = %m.channel, dropped = self.dropped_incoming, "irc: gateway is behind; message dropped");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// We left `ch` (kick, forced part): rejoin configured channels later.
    fn left(&mut self, c: &mut Conn, ch: &str) {
        let lower = irc_lower(ch);
        c.joined.remove(&lower);
        if self.s.channels.iter().any(|x| irc_lower(x) == lower)
            && !c.rejoin.iter().any(|(x, _)| irc_lower(x) == lower)
        {
            c.rejoin
                .push((ch.to_string(), Instant::now() + self.s.rejoin_delay));
        }
        self.publish(c);
    }

    fn publish(&self, c: &Conn) {
        let st = c.status(self.registrations);
        self.status.send_replace(st);
    }

    async fn on_welcome(&mut self, c: &mut Conn, msg: &Message) -> Result<(), String> {
        // Servers without CAP (or that ignored it) welcome us anyway.
        c.cap_ended = true;
        c.registered = true;
        if !msg.param(0).is_empty() {
            c.nick = msg.param(0).to_string();
        }
        self.registrations += 1;
        tracing::info!(nick = %c.nick, network = %self.s.network, caps = ?c.caps, "irc registered");
        let now = Instant::now();
        c.last_rx = now;
        c.join_deadline = now + JOIN_WAIT;
        c.awaiting_join = self.s.channels.iter().map(|ch| irc_lower(ch)).collect();
        // One JOIN per channel keeps every line short whatever the list.
        for ch in &self.s.channels {
            c.write(&format!("JOIN {ch}"), false).await?;
        }
        self.publish(c);
        Ok(())
    }

    async fn on_cap(&mut self, c: &mut Conn, msg: &Message) -> Result<(), String> {
        match msg.param(1).to_ascii_uppercase().as_str() {
            "LS" => {
                let more = msg.params.len() >= 4 && msg.param(2) == "*";
                let list = if more { msg.param(3) } else { msg.param(2) };
                c.cap_ls
                    .extend(list.split(' ').filter(|s| !s.is_empty()).map(String::from));
                if more || c.cap_ended || c.registered {
                    return Ok(());
                }
                let wanted = wanted_caps(&c.cap_ls, self.s.sasl.is_some());
                if self.s.sasl.is_some() && !wanted.iter().any(|w| w == "sasl") {
                    tracing::warn!(
                        "irc: SASL configured but the server does not offer SASL PLAIN; continuing without"
                    );
                }
                if wanted.is_empty() {
                    c.cap_end().await?;
                } else {
                    c.write(&format!("CAP REQ :{}", wanted.join(" ")), false)
                        .await?;
                }
            }
            "ACK" => {
                for cap in msg.params.last().map_or("", String::as_str).split(' ') {
                    if !cap.is_empty() && !cap.starts_with('-') {
                        c.caps.insert(cap.to_ascii_lowercase());
                    }
                }
                if c.caps.contains("sasl") && self.s.sasl.is_some() && !c.sasl_started {
                    c.sasl_started = true;
                    c.write("AUTHENTICATE PLAIN", false).await?;
                } else if !c.sasl_started {
                    c.cap_end().await?;
                }
            }
            "NAK" => {
                tracing::warn!(caps = %msg.params.last().map_or("", String::as_str), "irc: server refused capabilities");
                c.cap_end().await?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// The capabilities we ask for among those offered (`name` or `name=value`).
pub(super) fn wanted_caps(offered: &[String], sasl: bool) -> Vec<String> {
    let mut out = Vec::new();
    for cap in offered {
        let (name, value) = cap.split_once('=').unwrap_or((cap.as_str(), ""));
        let want = match name {
            "message-tags" | "account-tag" | "account-notify" => true,
            "sasl" => {
                sasl && (value.is_empty()
                    || value.split(',').any(|m| m.eq_ignore_ascii_case("PLAIN")))
            }
            _ => false,
        };
        if want && !out.iter().any(|o| o == name) {
            out.push(name.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(account_tag: bool) -> Ctx<'static> {
        Ctx {
            network: "net",
            nick: "fleetcmd",
            chantypes: "#&",
            account_tag,
        }
    }

    fn inc(line: &str, account_tag: bool) -> Result<Option<Incoming>, String> {
        let msg = Message::parse(line).map_err(|e| e.to_string())?;
        incoming(&msg, &ctx(account_tag))
    }

    #[test]
    fn channel_and_direct_messages() {
        let m = inc(
            ":alice!~alice@host.example PRIVMSG #Ops :!run uptime on all",
            false,
        )
        .expect("valid")
        .expect("for us");
        assert_eq!(m.identity.as_str(), "irc:net:alice!~alice@host.example");
        assert_eq!(m.channel, "irc:net:#ops");
        assert_eq!(m.text, "!run uptime on all");
        assert!(!m.direct && !m.from_bot && m.thread.is_none());

        let m = inc(":Alice!a@h PRIVMSG FleetCmd :whoami", false)
            .expect("valid")
            .expect("for us");
        assert_eq!(m.channel, "irc:net:Alice");
        assert!(m.direct);
        assert_eq!(m.thread.as_deref(), Some("alice!a@h"));
    }

    #[test]
    fn account_tag_only_when_negotiated_and_not_star() {
        let line = "@account=alice :mallory!m@h PRIVMSG #ops :!whoami";
        let with = inc(line, true).expect("valid").expect("for us");
        assert_eq!(with.identity.as_str(), "irc:net:alice");
        let without = inc(line, false).expect("valid").expect("for us");
        assert_eq!(without.identity.as_str(), "irc:net:mallory!m@h");
        let star = inc("@account=* :m!m@h PRIVMSG #ops :x", true)
            .expect("valid")
            .expect("for us");
        assert_eq!(star.identity.as_str(), "irc:net:m!m@h");
    }

    #[test]
    fn bots_ctcp_notices_and_strangers() {
        for line in [
            "@bot :other!o@h PRIVMSG #ops :!run x",
            "@draft/bot :other!o@h PRIVMSG #ops :!run x",
            ":fleetcmd!f@h PRIVMSG #ops :!run x",
        ] {
            let m = inc(line, false).expect("valid").expect("delivered");
            assert!(m.from_bot, "{line}");
        }
        assert_eq!(
            inc(":a!a@h PRIVMSG #ops :\x01ACTION !run x\x01", false),
            Ok(None)
        );
        assert_eq!(inc(":a!a@h PRIVMSG someoneelse :hi", false), Ok(None));
        assert!(inc(":server.example PRIVMSG #ops :hi", false).is_err());
        assert!(inc(":a!a@h PRIVMSG #ops", false).is_err());
    }

    #[test]
    fn nick_candidates() {
        let s = Settings {
            server: String::new(),
            port: 0,
            tls: None,
            password: None,
            nick: "fleetcmdbot".into(),
            alt_nicks: vec!["fcmd".into()],
            username: String::new(),
            realname: String::new(),
            network: String::new(),
            channels: vec![],
            sasl: None,
            burst: 4,
            interval: Duration::from_millis(500),
            ping_interval: Duration::from_secs(1),
            ping_timeout: Duration::from_secs(1),
            reconnect_min: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(1),
            rejoin_delay: Duration::from_secs(1),
        };
        let names: Vec<String> = (0..4).map(|i| nick_candidate(&s, i, false)).collect();
        assert_eq!(
            names,
            ["fleetcmdbot", "fcmd", "fleetcmdbot_1", "fleetcmdbot_2"]
        );
        assert_eq!(nick_candidate(&s, 12, true), "fleetc_11");
    }

    #[test]
    fn caps_requested() {
        let offered: Vec<String> = [
            "multi-prefix",
            "message-tags",
            "account-tag",
            "sasl=EXTERNAL,PLAIN",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            wanted_caps(&offered, true),
            ["message-tags", "account-tag", "sasl"]
        );
        assert_eq!(
            wanted_caps(&offered, false),
            ["message-tags", "account-tag"]
        );
        assert!(wanted_caps(&["sasl=EXTERNAL".to_string()], true).is_empty());
        assert!(wanted_caps(&["multi-prefix".to_string()], true).is_empty());
    }

    #[test]
    fn bucket_allows_a_burst_then_one_per_interval() {
        let t0 = Instant::now();
        let mut b = Bucket::new(4, Duration::from_millis(500), t0);
        for _ in 0..4 {
            assert_eq!(b.ready_at(t0), t0);
            b.take(t0);
        }
        assert_eq!(b.ready_at(t0), t0 + Duration::from_millis(500));
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.ready_at(t1), t1);
        b.take(t1);
        let wait = b.ready_at(t1 + Duration::from_millis(200)) - (t1 + Duration::from_millis(200));
        assert!(
            wait.abs_diff(Duration::from_millis(300)) < Duration::from_millis(2),
            "{wait:?}"
        );
        // A long pause refills to the burst, not beyond.
        let later = t1 + Duration::from_secs(60);
        for _ in 0..4 {
            assert_eq!(b.ready_at(later), later);
            b.take(later);
        }
        assert!(b.ready_at(later) > later);
    }

    #[test]
    fn backoff_grows_is_jittered_and_capped() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(60));
        for attempt in 0..40 {
            let nominal = (1.6f64.powi(attempt.min(30) as i32)).min(60.0);
            let d = backoff(attempt, min, max).as_secs_f64();
            assert!(
                d >= nominal * 0.8 - 1e-9 && d <= nominal * 1.2 + 1e-9,
                "{attempt}: {d}"
            );
        }
    }

    fn out(target: &str, text: &str, expect: Option<&str>, batch: u64) -> OutLine {
        OutLine {
            target: target.into(),
            text: text.into(),
            expect: expect.map(String::from),
            batch,
        }
    }

    #[test]
    fn waiting_lines_to_one_target_are_merged_whole_and_in_order() {
        let mut pending: VecDeque<OutLine> = [
            out("#ops", "job 2 ok — asked by bob", None, 2),
            out("#ops", "job 3 ok — asked by carol", None, 3),
            out("#dev", "job 4 ok — asked by dave", None, 4),
            out("#ops", "job 5 ok — asked by erin", None, 5),
        ]
        .into();
        let first = out("#ops", "job 1 ok — asked by alice", None, 1);
        let merged = coalesce(first.clone(), &mut pending, 400);
        assert_eq!(
            merged.text,
            "job 1 ok — asked by alice ‖ job 2 ok — asked by bob ‖ job 3 ok — asked by carol"
        );
        // Another target stops the merge: order across targets is kept.
        assert_eq!(pending.len(), 2);
        assert_eq!(pending[0].target, "#dev");

        // The budget is never exceeded and lines are never cut.
        let mut pending: VecDeque<OutLine> = [
            out("#ops", &"b".repeat(30), None, 2),
            out("#ops", "c", None, 3),
        ]
        .into();
        let merged = coalesce(out("#ops", &"a".repeat(30), None, 1), &mut pending, 65);
        assert_eq!(
            merged.text,
            format!("{} ‖ {}", "a".repeat(30), "b".repeat(30))
        );
        assert_eq!(merged.text.len(), 65);
        assert_eq!(pending.len(), 1, "`c` would not fit");
        let mut pending: VecDeque<OutLine> = [out("#ops", &"b".repeat(30), None, 2)].into();
        let merged = coalesce(out("#ops", &"a".repeat(30), None, 1), &mut pending, 64);
        assert_eq!((merged.text.len(), pending.len()), (30, 1));

        // Private replies are never merged (each is checked on its own).
        let mut pending: VecDeque<OutLine> = [out("bob", "x", Some("bob!b@h"), 2)].into();
        let merged = coalesce(out("bob", "y", None, 1), &mut pending, 400);
        assert_eq!((merged.text.as_str(), pending.len()), ("y", 1));
        let mut pending: VecDeque<OutLine> = [out("bob", "x", None, 2)].into();
        let merged = coalesce(out("bob", "y", Some("bob!b@h"), 1), &mut pending, 400);
        assert_eq!((merged.text.as_str(), pending.len()), ("y", 1));
    }

    #[test]
    fn case_mapping() {
        assert_eq!(irc_lower("Nick[A]\\~"), "nick{a}|^");
        assert!(same_nick("FleetCmd", "fleetcmd"));
    }
}
