//! One connection per chat account among several gateways. IRC, XMPP and
//! Matrix deliver every message to every connection (IRC with no id that
//! could be claimed, `crate::claims`), and two gateways with one config
//! would also fight over one nick. So the gateways of one chat account hold
//! a lease on it at the controller (`Claims.Hold`) and only the holder
//! connects; the others stand by and take over when the holder stops
//! renewing (a crash: after the lease's time to live) or releases it (a
//! clean stop: at once).
//!
//! [`Keeper`] is the pure part: from the answers of the controller and the
//! time of the last renewal it decides to start, keep or stop the
//! connection and when to ask next. [`Standby`] wraps a connection adapter
//! (unchanged: it is built anew for each holding, and stopped as on a stop
//! signal) and is what the router serves; its sending half
//! ([`SwitchSender`]) reaches whichever connection is up and refuses while
//! standing by.
//!
//! Timing, for a lease of `ttl` (`chat_lease`, default 30 s): renewed every
//! `ttl/3`; when no renewal succeeded for `2*ttl/3` (the controller is
//! unreachable, so another gateway may be about to take it) the connection
//! is stopped, a third of the lease before anyone else can take it. A
//! controller restart shorter than `ttl/3` is not noticed at all; one of up
//! to `2*ttl/3` costs nothing either, as the next renewal succeeds. A single
//! gateway cannot submit anything while its controller is down anyway;
//! after a longer outage it connects again as soon as the controller
//! answers.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use fleetcmd_proto::v1;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::adapters::{
    AdapterError, BoxFuture, ChatAdapter, ChatSender, Incoming, MessageRef, Reply,
};
use crate::controller::{ControllerError, GrpcController};

/// Shortest lease the controller grants (`controller::claims::MIN_HOLD_TTL`).
pub const MIN_TTL: Duration = Duration::from_secs(5);
/// Longest lease the controller grants (`controller::claims::MAX_HOLD_TTL`).
pub const MAX_TTL: Duration = Duration::from_secs(300);
/// A renewal that failed is tried again this soon (at most `ttl/3`).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// How long a stopping connection may take to say goodbye (IRC QUIT) and
/// a release may take, each: the process ends 2 s after a stop signal.
const STOP_GRACE: Duration = Duration::from_millis(800);

/// The lease calls, as the gateway makes them: the controller, or a fake
/// in tests.
pub trait LeaseApi: Send + Sync + 'static {
    fn hold(
        &self,
        req: v1::HoldRequest,
    ) -> BoxFuture<'_, Result<v1::HoldResponse, ControllerError>>;
}

impl LeaseApi for GrpcController {
    fn hold(
        &self,
        req: v1::HoldRequest,
    ) -> BoxFuture<'_, Result<v1::HoldResponse, ControllerError>> {
        Box::pin(GrpcController::hold(self, req))
    }
}

/// The lease's time to live and what follows from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub ttl: Duration,
}

impl Timing {
    /// Renewals (and, standing by, attempts to take the lease) this often.
    pub fn renew_every(self) -> Duration {
        self.ttl / 3
    }

    /// The connection stops this long after the last successful renewal
    /// was sent: a third of the lease before the controller frees it.
    pub fn hold_for(self) -> Duration {
        self.ttl * 2 / 3
    }
}

/// What the keeper asks the controller next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    Acquire,
    Renew(u64),
}

/// The controller's answer to an [`Ask`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Held(u64),
    /// Held by someone else (empty: by nobody any more).
    NotHeld(String),
    /// No answer (unreachable, timed out, refused).
    Failed(String),
    /// The controller does not know `Claims.Hold`: a version older than
    /// this gateway (a rolling upgrade that did the gateways first).
    Unsupported,
}

impl From<Result<v1::HoldResponse, ControllerError>> for Answer {
    fn from(r: Result<v1::HoldResponse, ControllerError>) -> Answer {
        match r {
            Ok(r) if r.held => Answer::Held(r.term),
            Ok(r) => Answer::NotHeld(r.holder),
            Err(e) if e.code == tonic::Code::Unimplemented => Answer::Unsupported,
            Err(e) => Answer::Failed(e.to_string()),
        }
    }
}

/// What to do with the chat connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Connect: this gateway holds the chat at this term.
    Start(u64),
    /// Nothing changes.
    Keep,
    /// Standing by, held by this other gateway (said once per holder).
    HeldBy(String),
    /// Disconnect: another gateway holds the chat now.
    Lost(String),
    /// Disconnect: no renewal succeeded in time.
    Expired,
}

/// The pure lease logic of one chat: no clock of its own, no network.
#[derive(Debug, Clone)]
pub struct Keeper {
    timing: Timing,
    /// The term held and when its last successful renewal was sent.
    held: Option<(u64, Instant)>,
    /// Whom the last refusal named (so "standing by" is logged once).
    seen: Option<String>,
    /// The last call failed (the next one comes sooner).
    failing: bool,
}

impl Keeper {
    pub fn new(timing: Timing) -> Keeper {
        Keeper {
            timing,
            held: None,
            seen: None,
            failing: false,
        }
    }

    pub fn ask(&self) -> Ask {
        match self.held {
            Some((term, _)) => Ask::Renew(term),
            None => Ask::Acquire,
        }
    }

    /// The term held, if any.
    pub fn term(&self) -> Option<u64> {
        self.held.map(|(t, _)| t)
    }

    /// Takes the answer to a call sent at `sent`, at `now`.
    pub fn answer(&mut self, now: Instant, sent: Instant, answer: Answer) -> Decision {
        self.failing = matches!(answer, Answer::Failed(_) | Answer::Unsupported);
        match (self.held, answer) {
            (None, Answer::Held(term)) => {
                self.held = Some((term, sent));
                self.seen = None;
                Decision::Start(term)
            }
            (Some(_), Answer::Held(term)) => {
                self.held = Some((term, sent));
                self.tick(now)
            }
            (Some(_), Answer::NotHeld(by)) => {
                self.held = None;
                self.seen = Some(by.clone());
                Decision::Lost(by)
            }
            (None, Answer::NotHeld(by)) => {
                if self.seen.as_ref() == Some(&by) {
                    Decision::Keep
                } else {
                    self.seen = Some(by.clone());
                    Decision::HeldBy(by)
                }
            }
            // A controller of an older version answers a renewal (the
            // gateway failed over to it mid-upgrade): no renewal, as when
            // it is unreachable.
            (_, Answer::Failed(_) | Answer::Unsupported) => self.tick(now),
        }
    }

    /// Stops holding once the last renewal is too old.
    pub fn tick(&mut self, now: Instant) -> Decision {
        match self.held {
            Some((_, since)) if now.saturating_duration_since(since) >= self.timing.hold_for() => {
                self.held = None;
                self.seen = None;
                Decision::Expired
            }
            _ => Decision::Keep,
        }
    }

    /// How long the next call may take: while holding, no longer than
    /// the holding lasts.
    pub fn call_limit(&self, now: Instant) -> Duration {
        let every = self.timing.renew_every();
        match self.held {
            Some((_, since)) => (since + self.timing.hold_for())
                .saturating_duration_since(now)
                .clamp(Duration::from_millis(100), every),
            None => every,
        }
    }

    /// How long to wait before the next call.
    pub fn next_in(&self, now: Instant) -> Duration {
        let every = self.timing.renew_every();
        let wait = if self.failing && self.held.is_some() {
            RETRY_AFTER_FAILURE.min(every)
        } else {
            every
        };
        match self.held {
            Some((_, since)) => {
                wait.min((since + self.timing.hold_for()).saturating_duration_since(now))
            }
            None => wait,
        }
    }
}

/// One process among the gateways: the host name, the pid and a random
/// part (a restarted gateway is a new holder).
pub fn holder_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .take(64)
        .collect();
    let mut random = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random);
    let random: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let host = if host.is_empty() { "gateway" } else { &host };
    format!("{host}/{}/{random}", std::process::id())
}

fn request(name: &str, holder: &str, timing: Timing, term: u64, release: bool) -> v1::HoldRequest {
    v1::HoldRequest {
        name: name.to_string(),
        holder: holder.to_string(),
        term,
        ttl_secs: u32::try_from(timing.ttl.as_secs()).unwrap_or(u32::MAX),
        release,
    }
}

/// The lease of one chat account: which lease, who asks, how long.
#[derive(Clone)]
pub struct Lease {
    pub api: Arc<dyn LeaseApi>,
    /// The lease's name (`claims::key` of the adapter and what identifies
    /// the account), the same on every gateway with the same section.
    pub name: String,
    /// What the logs call the chat (`irc`, `xmpp`, `matrix`).
    pub chat: &'static str,
    pub holder: String,
    pub timing: Timing,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("name", &self.name)
            .field("holder", &self.holder)
            .field("timing", &self.timing)
            .finish_non_exhaustive()
    }
}

impl Lease {
    async fn call(&self, term: u64, release: bool, limit: Duration) -> Answer {
        let req = request(&self.name, &self.holder, self.timing, term, release);
        match tokio::time::timeout(limit, self.api.hold(req)).await {
            Ok(r) => Answer::from(r),
            Err(_) => Answer::Failed(format!("no answer within {limit:?}")),
        }
    }

    /// Logs a decision and publishes the term held.
    fn publish(&self, d: &Decision, held: &watch::Sender<Option<u64>>) {
        let chat = self.chat;
        match d {
            Decision::Start(term) => {
                tracing::info!(chat, lease = %self.name, holder = %self.holder, term, "chat {chat}: holding the chat, connecting");
                held.send_replace(Some(*term));
            }
            Decision::HeldBy(by) if by.is_empty() => {}
            Decision::HeldBy(by) => {
                tracing::info!(chat, lease = %self.name, "chat {chat}: standing by: held by {by}");
            }
            Decision::Lost(by) => {
                let by = if by.is_empty() {
                    "nobody (it ran out)"
                } else {
                    by
                };
                tracing::warn!(chat, lease = %self.name, "chat {chat}: lease lost to {by}; disconnecting");
                held.send_replace(None);
            }
            Decision::Expired => {
                tracing::warn!(chat, lease = %self.name, "chat {chat}: lease not renewed in time (the controller unreachable, or this gateway was stopped or starved); disconnecting without reading what waits on the connection: commands typed meanwhile are not run here, and another gateway may hold the chat now");
                held.send_replace(None);
            }
            Decision::Keep => {}
        }
    }

    /// Keeps the lease until `stop` turns true: acquires, renews, and
    /// publishes the term held (`None`: stand by) on `held`.
    pub async fn keep(
        self,
        mut keeper: Keeper,
        held: watch::Sender<Option<u64>>,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let now = Instant::now();
            let d = keeper.tick(now);
            self.publish(&d, &held);
            let term = match keeper.ask() {
                Ask::Acquire => 0,
                Ask::Renew(t) => t,
            };
            let answer = tokio::select! {
                a = self.call(term, false, keeper.call_limit(now)) => a,
                _ = stop.wait_for(|s| *s) => return,
            };
            self.warn_failed(&answer);
            let d = keeper.answer(Instant::now(), now, answer);
            self.publish(&d, &held);
            tokio::select! {
                _ = tokio::time::sleep(keeper.next_in(Instant::now())) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    fn warn_failed(&self, answer: &Answer) {
        let chat = self.chat;
        match answer {
            Answer::Failed(e) => {
                tracing::warn!(chat, lease = %self.name, error = %e, "chat {chat}: cannot reach the controller for the chat's lease");
            }
            Answer::Unsupported => {
                tracing::warn!(chat, lease = %self.name, "chat {chat}: the controller does not arbitrate chat leases (Claims.Hold: a version older than this gateway); upgrade the controllers");
            }
            Answer::Held(_) | Answer::NotHeld(_) => {}
        }
    }

    /// Gives the lease up at `term`, so a standby takes over at once.
    async fn release(&self, term: u64) {
        match self.call(term, true, STOP_GRACE).await {
            Answer::Held(_) => {
                tracing::info!(chat = self.chat, lease = %self.name, "chat {}: lease released", self.chat);
            }
            Answer::NotHeld(_) => {}
            Answer::Failed(e) => {
                tracing::warn!(chat = self.chat, error = %e, "chat {}: lease not released; a standby takes over when it runs out", self.chat);
            }
            Answer::Unsupported => {}
        }
    }
}

/// A running connection and how to end it cleanly.
pub struct Connected<A> {
    pub adapter: A,
    /// Says goodbye and ends the adapter's input (IRC QUIT); `None`:
    /// dropping the adapter closes its connection.
    pub stop: Option<Box<dyn FnOnce() + Send>>,
}

/// Builds a new connection each time the lease is taken.
pub type ConnectFn<A> =
    Arc<dyn Fn() -> BoxFuture<'static, Result<Connected<A>, AdapterError>> + Send + Sync>;

/// A [`ConnectFn`] for an adapter built from `cfg` by `connect`, whose
/// connection closes when it is dropped.
pub fn connect_fn<C, A, F, Fut>(cfg: C, connect: F) -> ConnectFn<A>
where
    C: Send + Sync + 'static,
    A: ChatAdapter,
    F: Fn(Arc<C>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<A, AdapterError>> + Send + 'static,
{
    let cfg = Arc::new(cfg);
    Arc::new(move || {
        let adapter = connect(cfg.clone());
        Box::pin(async move {
            Ok(Connected {
                adapter: adapter.await?,
                stop: None,
            })
        })
    })
}

/// A connection adapter that is connected only while this gateway holds
/// its chat's lease; what the router serves in its place.
pub struct Standby<A: ChatAdapter> {
    lease: Lease,
    /// `false`: connected without a lease (an older controller), nothing
    /// to release.
    leased: bool,
    connect: ConnectFn<A>,
    active: Option<Connected<A>>,
    held: watch::Receiver<Option<u64>>,
    stop: watch::Receiver<bool>,
    sender: Arc<SwitchSender>,
}

impl<A: ChatAdapter> Standby<A> {
    /// Stops the running connection: its goodbye, then what it still
    /// delivers is dropped (another gateway may be connected by now).
    async fn disconnect(&mut self) {
        self.sender.set(None);
        let Some(mut c) = self.active.take() else {
            return;
        };
        if let Some(stop) = c.stop.take() {
            stop();
            let _ = tokio::time::timeout(STOP_GRACE, async {
                while let Some(m) = c.adapter.recv().await {
                    tracing::debug!(channel = %m.channel, "message after disconnecting dropped");
                }
            })
            .await;
        }
        tracing::info!(
            chat = self.lease.chat,
            "chat {}: disconnected",
            self.lease.chat
        );
    }

    /// Ends the input: disconnects and releases the lease.
    async fn finish(&mut self) -> Option<Incoming> {
        self.disconnect().await;
        let term = *self.held.borrow();
        if let Some(term) = term.filter(|_| self.leased) {
            self.lease.release(term).await;
        }
        None
    }
}

impl<A: ChatAdapter> ChatAdapter for Standby<A> {
    async fn recv(&mut self) -> Option<Incoming> {
        loop {
            if *self.stop.borrow() {
                return self.finish().await;
            }
            if let Some(c) = &mut self.active {
                tokio::select! {
                    m = c.adapter.recv() => match m {
                        Some(m) => return Some(m),
                        None => {
                            // The adapter ended its input on its own: the
                            // gateway stops serving it, as without a lease.
                            self.active = None;
                            return self.finish().await;
                        }
                    },
                    r = self.held.changed() => {
                        if r.is_err() || self.held.borrow().is_none() {
                            self.disconnect().await;
                        }
                    }
                    _ = self.stop.changed() => {}
                }
                continue;
            }
            if self.held.borrow_and_update().is_some() {
                match (self.connect)().await {
                    Ok(c) => {
                        self.sender.set(Some(c.adapter.sender()));
                        self.active = Some(c);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(chat = self.lease.chat, error = %e, "chat {}: cannot connect; trying again", self.lease.chat);
                        tokio::select! {
                            _ = tokio::time::sleep(self.lease.timing.renew_every()) => {}
                            _ = self.stop.changed() => {}
                        }
                        continue;
                    }
                }
            }
            tokio::select! {
                r = self.held.changed() => if r.is_err() {
                    // The keeper is gone: nothing will ever be held again.
                    return self.finish().await;
                },
                _ = self.stop.changed() => {}
            }
        }
    }

    fn sender(&self) -> Arc<dyn ChatSender> {
        self.sender.clone()
    }
}

/// The sending half of a [`Standby`]: the running connection's, or a
/// refusal while standing by.
pub struct SwitchSender {
    chat: &'static str,
    current: RwLock<Option<Arc<dyn ChatSender>>>,
}

impl SwitchSender {
    fn get(&self) -> Option<Arc<dyn ChatSender>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, to: Option<Arc<dyn ChatSender>>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = to;
    }

    fn standing_by(&self) -> AdapterError {
        AdapterError::Platform {
            what: self.chat.to_string(),
            message: "standing by: another gateway holds this chat".into(),
        }
    }
}

impl ChatSender for SwitchSender {
    fn send<'a>(
        &'a self,
        channel: &'a str,
        reply: Reply,
    ) -> BoxFuture<'a, Result<MessageRef, AdapterError>> {
        match self.get() {
            Some(s) => Box::pin(async move { s.send(channel, reply).await }),
            None => Box::pin(std::future::ready(Err(self.standing_by()))),
        }
    }

    fn edit<'a>(
        &'a self,
        msg: &'a MessageRef,
        reply: Reply,
    ) -> BoxFuture<'a, Result<(), AdapterError>> {
        match self.get() {
            Some(s) => Box::pin(async move { s.edit(msg, reply).await }),
            None => Box::pin(std::future::ready(Err(self.standing_by()))),
        }
    }

    fn can_edit(&self) -> bool {
        self.get().is_none_or(|s| s.can_edit())
    }

    fn ack_grace(&self) -> Duration {
        self.get().map(|s| s.ack_grace()).unwrap_or_default()
    }

    fn active(&self) -> bool {
        self.get().is_some()
    }
}

/// Serves a connection adapter under its chat's lease: tries to take the
/// lease once now, so a lone gateway connects (and a bad secret fails the
/// start) as it did without one, then keeps it in the background.
/// `account` names the chat account (IRC: server, port and nick; XMPP: the
/// JID; Matrix: the homeserver and user id).
pub async fn serve<A: ChatAdapter>(
    cx: &mut crate::registry::BuildContext,
    chat: &'static str,
    account: &[&str],
    connect: ConnectFn<A>,
) -> Result<(), String> {
    let lease = Lease {
        api: Arc::new(cx.router().controller().clone()),
        name: crate::claims::key(chat, account),
        chat,
        holder: holder_id(),
        timing: cx.chat_lease(),
    };
    let (active, first) = first_hold(&lease, &connect).await?;
    let (held_tx, held) = watch::channel(match &first {
        First::Leased(keeper) => keeper.term(),
        First::Unleased => Some(0),
    });
    let (stop_tx, stop) = watch::channel(false);
    cx.on_stop(move || {
        stop_tx.send_replace(true);
    });
    let leased = match first {
        First::Leased(keeper) => {
            cx.background(lease.clone().keep(keeper, held_tx, stop.clone()));
            true
        }
        // Connected for the life of the process, as before chat leases.
        First::Unleased => {
            let mut stop = stop.clone();
            cx.background(async move {
                let _ = stop.wait_for(|s| *s).await;
                drop(held_tx);
            });
            false
        }
    };
    let sender = Arc::new(SwitchSender {
        chat,
        current: RwLock::new(active.as_ref().map(|c| c.adapter.sender())),
    });
    cx.serve(
        chat,
        Standby {
            lease,
            leased,
            connect,
            active,
            held,
            stop,
            sender,
        },
    );
    Ok(())
}

/// How the first attempt went.
enum First {
    /// The controller arbitrates the chat: keep the lease from here.
    Leased(Keeper),
    /// The controller is older than chat leases: this gateway connects
    /// without one (run one gateway per such chat until the controllers
    /// are upgraded).
    Unleased,
}

/// The first attempt: connects at once when the lease is taken, or when
/// the controller is too old to know leases.
async fn first_hold<A: ChatAdapter>(
    lease: &Lease,
    connect: &ConnectFn<A>,
) -> Result<(Option<Connected<A>>, First), String> {
    let mut keeper = Keeper::new(lease.timing);
    let sent = Instant::now();
    let limit = lease.timing.renew_every().min(Duration::from_secs(5));
    let answer = lease.call(0, false, limit).await;
    let chat = lease.chat;
    match &answer {
        Answer::Failed(e) => {
            tracing::warn!(chat, error = %e, "chat {chat}: cannot reach the controller for the chat's lease; connecting once it answers");
        }
        Answer::Unsupported => {
            tracing::warn!(
                chat,
                "chat {chat}: the controller does not arbitrate chat leases (Claims.Hold: a version older than this gateway); connecting without a lease: run one gateway for this chat until the controllers are upgraded, then restart it"
            );
            let c = connect().await.map_err(|e| e.to_string())?;
            return Ok((Some(c), First::Unleased));
        }
        Answer::Held(_) | Answer::NotHeld(_) => {}
    }
    let d = keeper.answer(Instant::now(), sent, answer);
    let (dummy, _) = watch::channel(None);
    lease.publish(&d, &dummy);
    let Some(term) = keeper.term() else {
        return Ok((None, First::Leased(keeper)));
    };
    match connect().await {
        Ok(c) => Ok((Some(c), First::Leased(keeper))),
        Err(e) => {
            lease.release(term).await;
            Err(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(30);

    fn keeper() -> (Keeper, Instant) {
        (Keeper::new(Timing { ttl: TTL }), Instant::now())
    }

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn a_lone_gateway_holds_at_once_and_keeps_it_through_renewals() {
        let (mut k, t0) = keeper();
        assert_eq!(k.ask(), Ask::Acquire);
        assert_eq!(k.answer(t0, t0, Answer::Held(3)), Decision::Start(3));
        assert_eq!(k.ask(), Ask::Renew(3));
        assert_eq!(k.next_in(t0), s(10));
        for i in 1..10 {
            let at = t0 + s(10 * i);
            assert_eq!(k.tick(at), Decision::Keep, "renewal {i}");
            assert_eq!(k.answer(at, at, Answer::Held(3)), Decision::Keep);
        }
    }

    #[test]
    fn a_short_controller_outage_keeps_the_connection_a_long_one_stops_it() {
        let (mut k, t0) = keeper();
        k.answer(t0, t0, Answer::Held(1));
        // The renewal at 10 s fails; the next comes sooner.
        let at = t0 + s(10);
        assert_eq!(
            k.answer(at, at, Answer::Failed("down".into())),
            Decision::Keep
        );
        assert_eq!(k.next_in(at), s(1));
        // The controller is back at 15 s: nothing was dropped.
        let at = t0 + s(15);
        assert_eq!(k.answer(at, at, Answer::Held(1)), Decision::Keep);
        assert_eq!(k.next_in(at), s(10));
        // Now it stays away: 20 s after the last renewal sent, stop.
        let last = at;
        for secs in [1, 5, 19] {
            let at = last + s(secs);
            assert_eq!(
                k.answer(at, at, Answer::Failed("down".into())),
                Decision::Keep,
                "{secs}"
            );
            assert!(k.call_limit(at) <= s(20 - secs), "{secs}");
        }
        assert_eq!(
            k.next_in(last + s(19) + Duration::from_millis(500)),
            Duration::from_millis(500)
        );
        assert_eq!(k.tick(last + s(20)), Decision::Expired);
        assert_eq!(k.ask(), Ask::Acquire);
        assert_eq!(k.next_in(last + s(20)), s(10));
    }

    #[test]
    fn a_standby_says_who_holds_once_and_takes_over_when_free() {
        let (mut k, t0) = keeper();
        assert_eq!(
            k.answer(t0, t0, Answer::NotHeld("gw-a".into())),
            Decision::HeldBy("gw-a".into())
        );
        assert_eq!(
            k.answer(t0, t0, Answer::NotHeld("gw-a".into())),
            Decision::Keep
        );
        assert_eq!(
            k.answer(t0, t0, Answer::NotHeld("gw-b".into())),
            Decision::HeldBy("gw-b".into())
        );
        assert_eq!(k.tick(t0 + s(3600)), Decision::Keep);
        assert_eq!(k.next_in(t0), s(10));
        assert_eq!(k.answer(t0, t0, Answer::Held(9)), Decision::Start(9));
    }

    #[test]
    fn a_renewal_refused_stops_at_once() {
        let (mut k, t0) = keeper();
        k.answer(t0, t0, Answer::Held(1));
        let at = t0 + s(10);
        assert_eq!(
            k.answer(at, at, Answer::NotHeld("gw-b".into())),
            Decision::Lost("gw-b".into())
        );
        assert_eq!(k.ask(), Ask::Acquire);
        // A late renewal answer counts from when it was sent.
        let (mut k, t0) = keeper();
        k.answer(t0, t0, Answer::Held(1));
        let sent = t0 + s(10);
        assert_eq!(
            k.answer(t0 + s(31), sent, Answer::Held(1)),
            Decision::Expired
        );
    }

    /// The lease of the fake controller and its gateways: short, so the
    /// test runs in real time.
    const FAKE_TTL: Duration = Duration::from_millis(300);

    /// The controller's lease rules, in memory: one lease, and a switch
    /// that makes it unreachable.
    #[derive(Default)]
    struct FakeController {
        lease: std::sync::Mutex<(String, u64, Option<Instant>)>,
        down: std::sync::atomic::AtomicBool,
    }

    impl LeaseApi for FakeController {
        fn hold(
            &self,
            req: v1::HoldRequest,
        ) -> BoxFuture<'_, Result<v1::HoldResponse, ControllerError>> {
            let answer = if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                Err(ControllerError {
                    code: tonic::Code::Unavailable,
                    message: "down".into(),
                })
            } else {
                let mut l = self.lease.lock().expect("lease");
                let now = Instant::now();
                let live = l.2.is_some_and(|until| until > now);
                let ttl = FAKE_TTL;
                let mine = live && l.0 == req.holder;
                let held = match (req.release, req.term) {
                    (false, 0) if !live || mine => {
                        if !mine {
                            l.1 += 1;
                        }
                        l.0 = req.holder.clone();
                        l.2 = Some(now + ttl);
                        true
                    }
                    (false, t) if mine && t == l.1 => {
                        l.2 = Some(now + ttl);
                        true
                    }
                    (true, t) if mine && t == l.1 => {
                        l.2 = None;
                        true
                    }
                    _ => false,
                };
                Ok(v1::HoldResponse {
                    held,
                    term: if held { l.1 } else { 0 },
                    holder: if held { String::new() } else { l.0.clone() },
                })
            };
            Box::pin(std::future::ready(answer))
        }
    }

    /// Connections alive now, and the most ever alive at once.
    #[derive(Default)]
    struct Live {
        now: std::sync::atomic::AtomicUsize,
        max: std::sync::atomic::AtomicUsize,
    }

    /// A chat connection that delivers nothing and counts itself alive
    /// until dropped.
    struct FakeChat(Arc<Live>);

    impl Drop for FakeChat {
        fn drop(&mut self) {
            self.0.now.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl ChatAdapter for FakeChat {
        async fn recv(&mut self) -> Option<Incoming> {
            std::future::pending().await
        }

        fn sender(&self) -> Arc<dyn ChatSender> {
            Arc::new(NoSender)
        }
    }

    struct NoSender;

    impl ChatSender for NoSender {
        fn send<'a>(
            &'a self,
            _: &'a str,
            _: Reply,
        ) -> BoxFuture<'a, Result<MessageRef, AdapterError>> {
            Box::pin(std::future::ready(Err(AdapterError::UnknownMessage(
                "none".into(),
            ))))
        }

        fn edit<'a>(
            &'a self,
            _: &'a MessageRef,
            _: Reply,
        ) -> BoxFuture<'a, Result<(), AdapterError>> {
            Box::pin(std::future::ready(Ok(())))
        }
    }

    /// One gateway's standby on `ctl`: its stop switch and its serving task.
    fn gateway(
        ctl: &Arc<FakeController>,
        live: &Arc<Live>,
        holder: &str,
    ) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        let timing = Timing { ttl: FAKE_TTL };
        let lease = Lease {
            api: ctl.clone(),
            name: "irc/x".into(),
            chat: "irc",
            holder: holder.into(),
            timing,
        };
        let (held_tx, held) = watch::channel(None);
        let (stop_tx, stop) = watch::channel(false);
        let live2 = live.clone();
        let connect: ConnectFn<FakeChat> = Arc::new(move || {
            let live = live2.clone();
            Box::pin(async move {
                use std::sync::atomic::Ordering::SeqCst;
                let n = live.now.fetch_add(1, SeqCst) + 1;
                live.max.fetch_max(n, SeqCst);
                Ok(Connected {
                    adapter: FakeChat(live),
                    stop: None,
                })
            })
        });
        let mut standby = Standby {
            lease: lease.clone(),
            leased: true,
            connect,
            active: None,
            held,
            stop: stop.clone(),
            sender: Arc::new(SwitchSender {
                chat: "irc",
                current: RwLock::new(None),
            }),
        };
        let keeper = tokio::spawn(lease.keep(Keeper::new(timing), held_tx, stop));
        let task = tokio::spawn(async move {
            while standby.recv().await.is_some() {}
            keeper.abort();
        });
        (stop_tx, task)
    }

    async fn until(what: &str, mut ok: impl FnMut() -> bool) {
        let start = std::time::Instant::now();
        while !ok() {
            assert!(start.elapsed() < s(10), "no {what} within 10 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A controller older than chat leases.
    struct OldController(std::sync::atomic::AtomicUsize);

    impl LeaseApi for OldController {
        fn hold(
            &self,
            _: v1::HoldRequest,
        ) -> BoxFuture<'_, Result<v1::HoldResponse, ControllerError>> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(std::future::ready(Err(ControllerError::from(
                tonic::Status::unimplemented("unknown method Hold"),
            ))))
        }
    }

    #[tokio::test]
    async fn a_gateway_newer_than_its_controller_connects_without_a_lease() {
        use std::sync::atomic::Ordering::SeqCst;
        let old = Arc::new(OldController(Default::default()));
        let lease = Lease {
            api: old.clone(),
            name: "irc/x".into(),
            chat: "irc",
            holder: "gw-a".into(),
            timing: Timing { ttl: FAKE_TTL },
        };
        let live = Arc::new(Live::default());
        let live2 = live.clone();
        let connect: ConnectFn<FakeChat> = Arc::new(move || {
            let live = live2.clone();
            Box::pin(async move {
                live.now.fetch_add(1, SeqCst);
                Ok(Connected {
                    adapter: FakeChat(live),
                    stop: None,
                })
            })
        });
        let (active, first) = first_hold(&lease, &connect).await.expect("starts");
        assert!(active.is_some(), "connected at once");
        assert!(matches!(first, First::Unleased));
        assert_eq!(live.now.load(SeqCst), 1);
        assert_eq!(old.0.load(SeqCst), 1, "asked once");

        // A holder whose renewal reaches an older controller (failed over
        // mid-upgrade) goes on as if it were unreachable.
        let (mut k, t0) = keeper();
        k.answer(t0, t0, Answer::Held(4));
        let at = t0 + s(10);
        assert_eq!(k.answer(at, at, Answer::Unsupported), Decision::Keep);
        assert_eq!(k.next_in(at), s(1));
        assert_eq!(k.tick(t0 + s(20)), Decision::Expired);
    }

    #[tokio::test]
    async fn two_gateways_on_a_fake_controller_connect_one_at_a_time() {
        use std::sync::atomic::Ordering::SeqCst;
        let ctl = Arc::new(FakeController::default());
        let live = Arc::new(Live::default());
        let (stop_a, task_a) = gateway(&ctl, &live, "gw-a");
        let (stop_b, task_b) = gateway(&ctl, &live, "gw-b");
        until("connection", || live.now.load(SeqCst) == 1).await;
        // Many renewals later, still one.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(live.now.load(SeqCst), 1);
        // The controller goes away: the holder disconnects (after 2/3 of
        // the lease) and nobody connects while it is away.
        ctl.down.store(true, SeqCst);
        until("disconnection", || live.now.load(SeqCst) == 0).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(live.now.load(SeqCst), 0);
        // Back: one connects again.
        ctl.down.store(false, SeqCst);
        until("reconnection", || live.now.load(SeqCst) == 1).await;
        // The holder stops cleanly: it releases, the other takes over.
        let holder = ctl.lease.lock().expect("lease").0.clone();
        if holder == "gw-a" {
            stop_a.send_replace(true);
            task_a.await.expect("a ends");
        } else {
            stop_b.send_replace(true);
            task_b.await.expect("b ends");
        }
        until("takeover", || {
            live.now.load(SeqCst) == 1 && ctl.lease.lock().expect("lease").0 != holder
        })
        .await;
        assert_eq!(live.max.load(SeqCst), 1, "never two connections at once");
    }
}
