//! Controller service alerts to incident tools (issue 7): the
//! controller's `Health.Watch` stream of [`v1::AlertEvent`]s drives
//! [`pagerduty`] (Events API v2), [`opsgenie`] (Alerts API) and
//! [`statuspage`] (component status), each optional in `gateway.toml`.
//!
//! What is sent when ([`decide`]): SNAPSHOT and TRANSITION events carry a
//! level — `degraded`/`down` opens (trigger, create, or sets the component),
//! `ok` closes; `unknown` changes nothing; REMINDERs are left to the tools'
//! own escalation. A SNAPSHOT is what the Watch sends first, so a gateway
//! restart converges every tool on the current state. Silenced services do
//! not page (PagerDuty, Opsgenie) but still resolve; Statuspage ignores
//! silences (the public status is the truth).
//!
//! Each integration has its own bounded queue ([`QUEUE`]) and task, so a
//! slow or failing one never delays the others; within one integration
//! events are handled in order (a trigger is never overtaken by its
//! resolve). A full queue drops the event with a warning and a counter —
//! the next SNAPSHOT (a Watch reconnect) converges again. Requests are
//! retried on 429, 5xx and transport errors with exponential backoff and
//! jitter ([`Retry`]), a bounded number of times; refusals (400, 401, 404,
//! 422) are logged once, naming the service, and not retried. Keys and
//! tokens are [`Secret`]s: never in logs or error messages.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fleetcmd_proto::v1;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use crate::secret::{check_secret, load_secret};

pub mod opsgenie;
pub mod pagerduty;
pub mod statuspage;

pub use opsgenie::{Opsgenie, OpsgenieConfig};
pub use pagerduty::{PagerDuty, PagerDutyConfig};
pub use statuspage::{Statuspage, StatuspageConfig};

/// Events queued per integration before new ones are dropped.
pub const QUEUE: usize = 256;

/// Retry and timeout defaults, in one place (each section may override).
pub mod defaults {
    pub const MAX_ATTEMPTS: u32 = 5;
    pub const BACKOFF_MS: u64 = 500;
    pub const TIMEOUT_MS: u64 = 10_000;
    /// Longest wait between two attempts, whatever the attempt number or
    /// the server's `Retry-After`.
    pub const MAX_BACKOFF_MS: u64 = 60_000;

    pub(crate) fn max_attempts() -> u32 {
        MAX_ATTEMPTS
    }
    pub(crate) fn backoff_ms() -> u64 {
        BACKOFF_MS
    }
    pub(crate) fn timeout_ms() -> u64 {
        TIMEOUT_MS
    }
}

/// A service's level, from `Service.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    Degraded,
    Down,
    Unknown,
}

impl Level {
    pub fn of(state: &str) -> Level {
        match state {
            "ok" => Level::Ok,
            "degraded" => Level::Degraded,
            "down" => Level::Down,
            _ => Level::Unknown,
        }
    }
}

/// What an integration does for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Trigger / create / set the component to this (degraded or down).
    Open(Level),
    /// Resolve / close / set operational.
    Close,
}

/// The action for `ev`, or none. `honour_silence`: a silenced service does
/// not open (it still closes).
pub fn decide(ev: &v1::AlertEvent, honour_silence: bool) -> Option<Action> {
    let kind = v1::alert_event::Kind::try_from(ev.kind).ok()?;
    if !matches!(
        kind,
        v1::alert_event::Kind::Snapshot | v1::alert_event::Kind::Transition
    ) {
        return None;
    }
    match Level::of(&ev.service.as_ref()?.state) {
        Level::Ok => Some(Action::Close),
        l @ (Level::Degraded | Level::Down) if !(honour_silence && ev.silenced) => {
            Some(Action::Open(l))
        }
        _ => None,
    }
}

/// Bounded retries with exponential backoff and jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    pub max_attempts: u32,
    pub base: Duration,
}

impl Retry {
    pub fn new(max_attempts: u32, backoff_ms: u64) -> Retry {
        Retry {
            max_attempts: max_attempts.max(1),
            base: Duration::from_millis(backoff_ms),
        }
    }

    /// The wait after failed attempt `n` (0-based): base × 2ⁿ, capped at
    /// [`defaults::MAX_BACKOFF_MS`], times a random factor in [0.5, 1) so
    /// many gateways do not retry in step; at least `retry_after`.
    pub fn delay(&self, n: u32, retry_after: Option<Duration>) -> Duration {
        let max = Duration::from_millis(defaults::MAX_BACKOFF_MS);
        let jittered = crate::backoff::Backoff {
            first: self.base,
            factor: 2.0,
            max,
            jitter: crate::backoff::Jitter::HalfToFull,
        }
        .delay(n);
        jittered.max(retry_after.unwrap_or_default()).min(max)
    }
}

/// How one HTTP attempt ended.
#[derive(Debug)]
pub(crate) enum Attempt {
    /// Accepted; the note is logged (request id, dedup key).
    Done(String),
    /// Worth retrying (429, 5xx, transport), after at least the given wait.
    Again(String, Option<Duration>),
    /// Refused for good (400, 401, 404, 422): logged, not retried.
    Refused(String),
}

/// Why a request was given up (already logged by [`attempts`]).
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum GiveUp {
    #[error("{what}: refused: {why}")]
    Refused { what: String, why: String },
    #[error("{what}: failed after {attempts} attempts: {why}")]
    Exhausted {
        what: String,
        attempts: u32,
        why: String,
    },
}

/// Runs `attempt` until it is done, refused, or `retry` is exhausted; logs
/// the outcome once. `what` names the integration, call and service (never
/// a secret).
pub(crate) async fn attempts<F, Fut>(
    what: &str,
    retry: Retry,
    mut attempt: F,
) -> Result<String, GiveUp>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Attempt>,
{
    let mut n = 0;
    loop {
        match attempt().await {
            Attempt::Done(note) => {
                tracing::info!(what, attempts = n + 1, note = %note, "alert integration request accepted");
                return Ok(note);
            }
            Attempt::Refused(why) => {
                tracing::error!(what, why = %why, "alert integration request refused; not retried");
                return Err(GiveUp::Refused {
                    what: what.to_string(),
                    why,
                });
            }
            Attempt::Again(why, after) => {
                n += 1;
                if n >= retry.max_attempts {
                    tracing::error!(what, attempts = n, why = %why, "alert integration request failed; giving up");
                    return Err(GiveUp::Exhausted {
                        what: what.to_string(),
                        attempts: n,
                        why,
                    });
                }
                let wait = retry.delay(n - 1, after);
                tracing::warn!(what, attempt = n, why = %why, wait_ms = wait.as_millis() as u64, "alert integration request failed; retrying");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Sends a request and classifies the answer: 2xx is done (`ok` makes the
/// note from the body), 429/420/5xx and transport errors are retried,
/// anything else is refused (`refused` makes the message from status and
/// body).
pub(crate) async fn classify(
    req: reqwest::RequestBuilder,
    ok: impl FnOnce(&str) -> String,
    refused: impl FnOnce(reqwest::StatusCode, &str) -> String,
) -> Attempt {
    let resp = match req.send().await {
        Ok(r) => r,
        // reqwest's message names the URL, which holds no secret here.
        Err(e) => return Attempt::Again(format!("request failed: {e}"), None),
    };
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body = read_capped(resp).await;
    if status.is_success() {
        Attempt::Done(ok(&body))
    } else if status.as_u16() == 429 || status.as_u16() == 420 || status.is_server_error() {
        Attempt::Again(format!("{status}: {}", one_line(&body)), retry_after)
    } else {
        Attempt::Refused(refused(status, &body))
    }
}

/// The first 4 KiB of a response body, lossily decoded.
async fn read_capped(resp: reqwest::Response) -> String {
    String::from_utf8_lossy(&crate::body::read_response_prefix(resp, 4096).await).into_owned()
}

/// Text on one line, capped (for logs and refusal messages).
pub(crate) fn one_line(s: &str) -> String {
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.chars().count() > 300 {
        let mut t: String = s.chars().take(300).collect();
        t.push('…');
        t
    } else {
        s
    }
}

/// Makes a relative path relative to `base`.
pub(crate) fn resolve(f: &mut Option<PathBuf>, base: &Path) {
    if let Some(f) = f
        && f.is_relative()
    {
        *f = base.join(&*f);
    }
}

/// Checks an http(s) URL setting.
pub(crate) fn check_url(p: &mut Vec<(String, String)>, key: String, url: &str) {
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
        Ok(_) => p.push((key, "must be an http(s) URL with a host".into())),
        Err(e) => p.push((key, format!("not a URL: {e}"))),
    }
}

/// Checks the shared retry settings of a section.
pub(crate) fn check_retry(
    p: &mut Vec<(String, String)>,
    at: &str,
    max_attempts: u32,
    timeout_ms: u64,
) {
    if !(1..=20).contains(&max_attempts) {
        p.push((format!("{at}.max_attempts"), "1 to 20".into()));
    }
    if timeout_ms == 0 {
        p.push((format!("{at}.timeout_ms"), "must be positive".into()));
    }
}

/// The HTTP client of an integration (rustls, Mozilla roots, no redirects).
pub(crate) fn client(timeout_ms: u64) -> Result<reqwest::Client, String> {
    crate::http_client::http_client(Duration::from_millis(timeout_ms)).map_err(|e| e.to_string())
}

/// `fleetcmd-<service>`: the PagerDuty dedup key and Opsgenie alias.
pub fn alert_key(service: &str) -> String {
    format!("fleetcmd-{service}")
}

/// Instances as `{agent_id: state}` for custom details.
pub(crate) fn instances(s: &v1::Service) -> BTreeMap<String, String> {
    s.instances
        .iter()
        .map(|i| {
            let state = match v1::CheckState::try_from(i.state) {
                Ok(v1::CheckState::Ok) => "ok",
                Ok(v1::CheckState::Warning) => "warning",
                Ok(v1::CheckState::Critical) => "critical",
                _ => "unknown",
            };
            let state = if i.online { state } else { "offline" };
            (i.agent_id.clone(), state.to_string())
        })
        .collect()
}

/// One integration: handles events in order, on its own task.
pub trait Integration: Send + Sync + 'static {
    /// `pagerduty`, `opsgenie`, `statuspage`.
    fn name(&self) -> &'static str;
    /// Sends what `ev` calls for (retries included); logs failures itself.
    fn handle(&self, ev: &v1::AlertEvent) -> impl Future<Output = ()> + Send;
}

/// One consumer of the service alert stream, ready to start on its own
/// task behind its own bounded queue.
pub struct AlertHook {
    name: &'static str,
    start: StartFn,
}

/// Starts an integration's task in the set; its queue's sending end.
type StartFn = Box<dyn FnOnce(&mut JoinSet<()>) -> EventQueue + Send>;

/// The sending end of one integration's event queue.
type EventQueue = mpsc::Sender<Arc<v1::AlertEvent>>;

impl std::fmt::Debug for AlertHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl AlertHook {
    /// `integration`, handling events in order on its own task.
    pub fn of<I: Integration>(integration: I) -> AlertHook {
        AlertHook {
            name: integration.name(),
            start: Box::new(move |set| worker(set, integration).1),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// The alert hooks the enabled components contributed.
#[derive(Debug, Default)]
pub struct Integrations {
    pub hooks: Vec<AlertHook>,
}

/// Events dropped because an integration's queue was full (all integrations).
pub static DROPPED: AtomicU64 = AtomicU64::new(0);

impl Integrations {
    /// Starts one task per integration, each behind its own bounded queue,
    /// and hands every event from `rx` to each queue. Ends when `rx` is
    /// closed and the queues are drained; aborting the handle stops
    /// everything (the workers are owned by it).
    pub fn spawn(self, rx: mpsc::Receiver<v1::AlertEvent>) -> JoinHandle<()> {
        tokio::spawn(self.run(rx))
    }

    /// What [`Integrations::spawn`] runs, for an owner's own task set.
    pub async fn run(self, mut rx: mpsc::Receiver<v1::AlertEvent>) {
        let mut workers = JoinSet::new();
        let queues: Vec<(&'static str, mpsc::Sender<Arc<v1::AlertEvent>>)> = self
            .hooks
            .into_iter()
            .map(|h| (h.name, (h.start)(&mut workers)))
            .collect();
        while let Some(ev) = rx.recv().await {
            let ev = Arc::new(ev);
            for (name, q) in &queues {
                // Full: drop (counted) rather than hold up the other
                // integrations; the next SNAPSHOT converges again.
                if q.try_send(ev.clone()).is_err() {
                    let dropped = DROPPED.fetch_add(1, Ordering::Relaxed) + 1;
                    let service = ev.service.as_ref().map(|s| s.name.as_str()).unwrap_or("");
                    tracing::warn!(
                        integration = name,
                        service,
                        dropped,
                        "alert integration queue full; event dropped"
                    );
                }
            }
        }
        drop(queues);
        while let Some(r) = workers.join_next().await {
            if let Err(e) = r {
                tracing::error!(error = %e, "alert integration task failed");
            }
        }
    }
}

fn worker<I: Integration>(
    set: &mut JoinSet<()>,
    i: I,
) -> (&'static str, mpsc::Sender<Arc<v1::AlertEvent>>) {
    let (tx, mut rx) = mpsc::channel::<Arc<v1::AlertEvent>>(QUEUE);
    let name = i.name();
    set.spawn(async move {
        while let Some(ev) = rx.recv().await {
            i.handle(&ev).await;
        }
    });
    (name, tx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use v1::alert_event::Kind;

    fn ev(kind: Kind, state: &str, silenced: bool) -> v1::AlertEvent {
        v1::AlertEvent {
            kind: kind as i32,
            service: Some(v1::Service {
                name: "api".into(),
                state: state.into(),
                ..v1::Service::default()
            }),
            silenced,
            ..v1::AlertEvent::default()
        }
    }

    #[test]
    fn what_is_sent_when() {
        use Action::*;
        let check = |kind, state, silenced, honour, want: Option<Action>| {
            assert_eq!(
                decide(&ev(kind, state, silenced), honour),
                want,
                "{kind:?} {state} silenced={silenced} honour={honour}"
            );
        };
        check(
            Kind::Transition,
            "degraded",
            false,
            true,
            Some(Open(Level::Degraded)),
        );
        check(
            Kind::Transition,
            "down",
            false,
            true,
            Some(Open(Level::Down)),
        );
        check(Kind::Transition, "ok", false, true, Some(Close));
        check(Kind::Snapshot, "down", false, true, Some(Open(Level::Down)));
        check(Kind::Snapshot, "ok", false, true, Some(Close));
        check(Kind::Transition, "unknown", false, true, None);
        check(Kind::Reminder, "down", false, true, None);
        check(Kind::Unspecified, "down", false, true, None);
        // Silences stop pages, not resolves, and not Statuspage.
        check(Kind::Transition, "down", true, true, None);
        check(Kind::Transition, "ok", true, true, Some(Close));
        check(
            Kind::Transition,
            "down",
            true,
            false,
            Some(Open(Level::Down)),
        );
    }

    fn keys<T: serde::de::DeserializeOwned>(
        text: &str,
        validate: impl Fn(&T) -> Vec<(String, String)>,
    ) -> Vec<String> {
        let cfg: T = toml::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        validate(&cfg).into_iter().map(|(k, _)| k).collect()
    }

    #[test]
    fn sections_validate_every_key() {
        let pd = |t| keys(t, PagerDutyConfig::validate);
        assert_eq!(pd("routing_key = \"R0\""), Vec::<String>::new());
        assert_eq!(pd("api_token = \"t\""), Vec::<String>::new());
        assert_eq!(pd(""), ["pagerduty.routing_key"]);
        assert_eq!(
            pd(
                "routing_key = \"R0\"\nrouting_key_file = \"/nonexistent\"\nurl = \"ftp:x\"\n\
                schedules = { primary = \"P-1\" }\nmax_attempts = 0\ntimeout_ms = 0"
            ),
            [
                "pagerduty.routing_key",
                "pagerduty.schedules.primary",
                "pagerduty.url",
                "pagerduty.max_attempts",
                "pagerduty.timeout_ms"
            ]
        );
        let og = |t| keys(t, OpsgenieConfig::validate);
        assert_eq!(og("api_key = \"k\""), Vec::<String>::new());
        assert_eq!(og(""), ["opsgenie.api_key"]);
        assert_eq!(
            og("api_key_file = \"/nonexistent/og.key\""),
            ["opsgenie.api_key_file"]
        );
        let sp = |t| keys(t, StatuspageConfig::validate);
        assert_eq!(
            sp("api_key = \"k\"\npage_id = \"pg1\""),
            Vec::<String>::new()
        );
        assert_eq!(
            sp("page_id = \"pg/1\"\ncomponents = { api = \"\" }"),
            [
                "statuspage.api_key",
                "statuspage.page_id",
                "statuspage.components.api"
            ]
        );
        assert!(toml::from_str::<StatuspageConfig>("page_id = \"p\"\npageid = 1").is_err());
        let cfg: PagerDutyConfig =
            toml::from_str("routing_key = \"R0-secret\"\napi_token = \"T0-secret\"")
                .unwrap_or_else(|e| panic!("{e}"));
        let shown = format!("{cfg:?}");
        assert!(
            !shown.contains("R0-secret") && !shown.contains("T0-secret"),
            "{shown}"
        );
    }

    #[test]
    fn backoff_grows_is_jittered_and_capped() {
        let r = Retry::new(5, 100);
        for n in 0..4u32 {
            let d = r.delay(n, None);
            let full = Duration::from_millis(100 << n);
            assert!(d >= full / 2 && d <= full, "attempt {n}: {d:?}");
        }
        assert!(r.delay(30, None) <= Duration::from_millis(defaults::MAX_BACKOFF_MS));
        assert!(r.delay(0, Some(Duration::from_secs(2))) >= Duration::from_secs(2));
        assert!(r.delay(0, Some(Duration::from_secs(3600))) <= Duration::from_secs(60));
    }
}
