//! Service alerts into chat: the gateway follows the
//! controller's `Health.Watch` stream and posts each announced state change
//! (and reminder, and "started flapping") to the service's channels. The
//! controller has already damped and deduplicated them; silenced services'
//! events are not posted. Every event, snapshots included, is also handed
//! to the integrations (PagerDuty, Opsgenie, Statuspage) when configured.
//!
//! The stream is re-opened with backoff when it ends; the snapshot that
//! starts each stream is not posted (it is the state, not a change), so a
//! reconnect never repeats an alert.
//!
//! Several gateways on one chat all follow the stream: each post is
//! claimed first (`crate::claims`, key: the channel and the announcement),
//! so one of them posts it. When the claim cannot be made the alert is
//! posted anyway: an alert posted twice is better than none. The gateway
//! that posted says so with a second claim (`alert-posted/…`); each one
//! that lost the first claim checks back after [`CONFIRM_WAIT`] by making
//! that second claim itself: winning it means no gateway posted — the
//! winner died between its claim and its post, or could not post — and it
//! posts the alert late rather than lose it (`Confirmations`).

use std::sync::Arc;
use std::time::Duration;

use fleetcmd_proto::v1;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::adapters::{ChatSender, Reply};
use crate::claims::{self, Arbiter};
use crate::controller::ControllerApi;
use crate::router::Router;

/// Failing instances listed in one alert.
pub const MAX_INSTANCES: usize = 10;
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long a gateway that lost an alert's claim waits before it checks
/// that the winner posted it: longer than a post takes with the adapters'
/// retries of a rate-limited platform.
pub const CONFIRM_WAIT: Duration = Duration::from_secs(120);
/// Alerts waiting for that check at most; beyond, the oldest is dropped
/// with a warning (a storm of alerts, each lost claim kept 2 minutes).
const MAX_UNCONFIRMED: usize = 1000;

/// The chat message for an alert event; `None` for events that are not
/// posted (snapshots, silenced services).
pub fn render(ev: &v1::AlertEvent) -> Option<Reply> {
    use v1::alert_event::Kind;
    let kind = Kind::try_from(ev.kind).unwrap_or(Kind::Unspecified);
    if ev.silenced || matches!(kind, Kind::Snapshot | Kind::Unspecified) {
        return None;
    }
    let s = ev.service.as_ref()?;
    // A new service (or the first evaluation after it was configured)
    // becoming ok is not news: nothing had been reported as wrong.
    if kind == Kind::Transition && ev.from == "unknown" && s.state == "ok" {
        return None;
    }
    let tag = match (kind, s.state.as_str()) {
        (Kind::Flapping, _) => "FLAPPING".to_string(),
        (Kind::Transition, "ok") => "RECOVERED".to_string(),
        (_, state) => state.to_ascii_uppercase(),
    };
    let listed = kind != Kind::Flapping && s.state != "ok";
    // The controller's summary ends with the failing instances for pages,
    // which get one line; here they are listed below the header, so the
    // header says only what happened (else each instance shows twice).
    let headline = if listed {
        format!(
            "{} is {}{}: {} of {} instances pass",
            s.name,
            if kind == Kind::Reminder { "still " } else { "" },
            s.state,
            s.passing,
            s.total
        )
    } else {
        ev.summary.clone()
    };
    let mut reply = Reply::text(format!("[{tag}] {headline}"));
    if listed {
        let failing: Vec<&v1::ServiceInstance> =
            s.instances.iter().filter(|i| !i.passes()).collect();
        for i in failing.iter().take(MAX_INSTANCES) {
            reply.lines.push(if i.online {
                format!(
                    "  {}: {} {}",
                    i.agent_id,
                    v1::CheckState::label(i.state),
                    i.summary.lines().next().unwrap_or_default()
                )
            } else {
                format!("  {}: agent offline", i.agent_id)
            });
        }
        if failing.len() > MAX_INSTANCES {
            reply
                .lines
                .push(format!("  … {} more", failing.len() - MAX_INSTANCES));
        }
        reply.lines.push(format!(
            "details: `health {}` · mute: `silence {} 1h <reason>`",
            s.name, s.name
        ));
    }
    Some(reply)
}

/// Follows the controller's alert stream until the task is dropped,
/// posting through `senders` (by channel scheme) and handing every event
/// to `integrations` (bounded: when they fall behind, events are dropped
/// with a warning; the next snapshot brings them back in line).
pub async fn run<C: ControllerApi>(
    router: Arc<Router<C>>,
    senders: Vec<(String, Arc<dyn ChatSender>)>,
    integrations: Option<mpsc::Sender<v1::AlertEvent>>,
) {
    let ctl = router.controller();
    let mut backoff = BACKOFF_MIN;
    let mut unconfirmed = Confirmations::default();
    loop {
        let mut stream = match ctl.health_watch().await {
            Ok(s) => {
                tracing::info!("alerts: following the controller's health stream");
                s
            }
            Err(e) => {
                tracing::warn!(error = %e, "alerts: cannot follow the controller's health stream");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        loop {
            let due = unconfirmed.next_due();
            let item = tokio::select! {
                item = stream.next() => item,
                () = sleep_until(due), if due.is_some() => {
                    unconfirmed.check_due(ctl, &senders, tokio::time::Instant::now()).await;
                    continue;
                }
            };
            let ev = match item {
                Some(Ok(ev)) => ev,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "alerts: health stream failed");
                    break;
                }
                None => break,
            };
            backoff = BACKOFF_MIN;
            if let Some(tx) = &integrations
                && tx.try_send(ev.clone()).is_err()
            {
                tracing::warn!("alerts: integrations are behind; dropped one event");
            }
            post(ctl, &senders, &ev, &mut unconfirmed).await;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn sleep_until(due: Option<tokio::time::Instant>) {
    if let Some(at) = due {
        tokio::time::sleep_until(at).await;
    }
}

/// Posts `ev` to each of its channels this gateway wins the claim of; a
/// lost claim is kept in `unconfirmed` for the check that the winner
/// posted it.
async fn post(
    arbiter: &dyn Arbiter,
    senders: &[(String, Arc<dyn ChatSender>)],
    ev: &v1::AlertEvent,
    unconfirmed: &mut Confirmations,
) {
    let (Some(reply), Some(s)) = (render(ev), ev.service.as_ref()) else {
        return;
    };
    for channel in &s.channels {
        let post = AlertPost::new(channel, ev, reply.clone());
        // Only a gateway that can post to the channel claims it (found by
        // an outside test: gateways without the channel's adapter won
        // claims and posted nothing).
        let Some(out) = post.sender(senders) else {
            tracing::warn!(service = %s.name, %channel, "alerts: no enabled adapter posts to this channel");
            continue;
        };
        // A standby of a connection chat (`crate::standby`) leaves the
        // post to the holder, unclaimed, and checks it was posted should
        // it hold the chat by then (the holder may die before posting).
        if !out.active() {
            unconfirmed.push(post, tokio::time::Instant::now() + CONFIRM_WAIT);
            continue;
        }
        match arbiter.claim(post.key("alert"), claims::ALERT_TTL).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(service = %s.name, %channel, "alerts: posted by another gateway");
                unconfirmed.push(post, tokio::time::Instant::now() + CONFIRM_WAIT);
                continue;
            }
            Err(e) => {
                tracing::warn!(service = %s.name, %channel, error = %e, "alerts: cannot claim the post among the gateways; posting it anyway");
            }
        }
        post.send(arbiter, senders).await;
    }
}

/// One alert for one channel, as posted.
struct AlertPost {
    channel: String,
    service: String,
    /// What names the announcement: the channel, the service, the kind,
    /// the old and new state, its time.
    parts: [String; 6],
    reply: Reply,
}

impl AlertPost {
    fn new(channel: &str, ev: &v1::AlertEvent, reply: Reply) -> AlertPost {
        let s = ev.service.as_ref();
        let service = s.map(|s| s.name.clone()).unwrap_or_default();
        let state = s.map(|s| s.state.clone()).unwrap_or_default();
        AlertPost {
            channel: channel.to_owned(),
            parts: [
                channel.to_owned(),
                service.clone(),
                ev.kind.to_string(),
                ev.from.clone(),
                state,
                ev.at_ms.to_string(),
            ],
            service,
            reply,
        }
    }

    /// The claim key of `kind` (`alert`: who posts; `alert-posted`: it
    /// was posted) for this announcement in this channel.
    fn key(&self, kind: &str) -> String {
        let parts: Vec<&str> = self.parts.iter().map(String::as_str).collect();
        claims::key(kind, &parts)
    }

    /// The adapter of its channel's scheme, if one is enabled.
    fn sender<'a>(
        &self,
        senders: &'a [(String, Arc<dyn ChatSender>)],
    ) -> Option<&'a Arc<dyn ChatSender>> {
        let scheme = self.channel.split(':').next().unwrap_or_default();
        senders
            .iter()
            .find(|(name, _)| name == scheme)
            .map(|(_, out)| out)
    }

    /// Posts it, and once posted says so (`alert-posted`) for the gateways
    /// that lost the claim; a failed post says nothing, so one of them
    /// posts it after [`CONFIRM_WAIT`].
    async fn send(&self, arbiter: &dyn Arbiter, senders: &[(String, Arc<dyn ChatSender>)]) {
        if !self.deliver(senders).await {
            return;
        }
        if let Err(e) = arbiter
            .claim(self.key("alert-posted"), claims::ALERT_TTL)
            .await
        {
            tracing::warn!(service = %self.service, channel = %self.channel, error = %e, "alerts: cannot tell the other gateways this alert was posted; one may post it again");
        }
    }

    /// Posts it through the adapter of its channel's scheme; whether it
    /// was posted.
    async fn deliver(&self, senders: &[(String, Arc<dyn ChatSender>)]) -> bool {
        let (service, channel) = (&self.service, &self.channel);
        let Some(out) = self.sender(senders) else {
            tracing::warn!(%service, %channel, "alerts: no enabled adapter posts to this channel");
            return false;
        };
        match out.send(channel, self.reply.clone()).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(%service, %channel, error = %e, "alerts: post failed");
                false
            }
        }
    }
}

/// The alerts this gateway lost the claim of, each until its check that
/// the winner posted it is due.
#[derive(Default)]
struct Confirmations(std::collections::VecDeque<(tokio::time::Instant, AlertPost)>);

impl Confirmations {
    fn push(&mut self, post: AlertPost, due: tokio::time::Instant) {
        if self.0.len() >= MAX_UNCONFIRMED
            && let Some((_, old)) = self.0.pop_front()
        {
            tracing::warn!(service = %old.service, channel = %old.channel, "alerts: too many alerts to check; not checking that this one was posted");
        }
        self.0.push_back((due, post));
    }

    fn next_due(&self) -> Option<tokio::time::Instant> {
        self.0.front().map(|(due, _)| *due)
    }

    /// For each alert due at `now`: claims `alert-posted` itself; winning
    /// means no gateway posted it, so this one does (as when the claim
    /// cannot be made: posted twice is better than none).
    async fn check_due(
        &mut self,
        arbiter: &dyn Arbiter,
        senders: &[(String, Arc<dyn ChatSender>)],
        now: tokio::time::Instant,
    ) {
        while self.0.front().is_some_and(|(due, _)| *due <= now) {
            let Some((_, post)) = self.0.pop_front() else {
                break;
            };
            // Still a standby: the holder has it.
            if post.sender(senders).is_none_or(|out| !out.active()) {
                continue;
            }
            let (service, channel) = (&post.service, &post.channel);
            match arbiter
                .claim(post.key("alert-posted"), claims::ALERT_TTL)
                .await
            {
                Ok(false) => continue,
                Ok(true) => {
                    tracing::warn!(%service, %channel, "alerts: the gateway that claimed this alert did not post it; posting it late");
                }
                Err(e) => {
                    tracing::warn!(%service, %channel, error = %e, "alerts: cannot check that another gateway posted this alert; posting it");
                }
            }
            post.deliver(senders).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(
        id: &str,
        online: bool,
        state: v1::CheckState,
        summary: &str,
    ) -> v1::ServiceInstance {
        v1::ServiceInstance {
            agent_id: id.into(),
            online,
            state: state as i32,
            summary: summary.into(),
            checked_at_ms: 0,
        }
    }

    fn event(kind: v1::alert_event::Kind, state: &str, silenced: bool) -> v1::AlertEvent {
        v1::AlertEvent {
            kind: kind as i32,
            service: Some(v1::Service {
                name: "api".into(),
                state: state.into(),
                passing: 1,
                total: 3,
                instances: vec![
                    instance("web-1", true, v1::CheckState::Ok, "HTTP OK"),
                    instance(
                        "web-2",
                        true,
                        v1::CheckState::Critical,
                        "connection refused\nmore",
                    ),
                    instance("web-3", false, v1::CheckState::Unknown, "agent offline"),
                ],
                channels: vec!["irc:#ops".into()],
                ..Default::default()
            }),
            from: "ok".into(),
            silenced,
            at_ms: 0,
            // As the controller writes it: the failing instances included.
            summary: "api is degraded: 1 of 3 instances pass (web-2: CRITICAL connection refused; \
                      web-3: offline)"
                .into(),
        }
    }

    /// The whole message as a person reads it: each failing instance once.
    fn text(r: &Reply) -> String {
        std::iter::once(r.header.as_str())
            .chain(r.lines.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The controller's claims as several gateways share them: the first
    /// claim of a key wins.
    #[derive(Default)]
    struct SharedClaims(std::sync::Mutex<std::collections::HashSet<String>>);

    impl Arbiter for SharedClaims {
        fn claim(
            &self,
            key: String,
            _ttl: Duration,
        ) -> crate::adapters::BoxFuture<'_, Result<bool, crate::controller::ControllerError>>
        {
            let won = self.0.lock().expect("claims").insert(key);
            Box::pin(async move { Ok(won) })
        }
    }

    /// A chat that records what is posted to it; `.1`: this gateway
    /// stands by on it (`crate::standby`).
    #[derive(Default)]
    struct Posted(
        std::sync::Mutex<Vec<(String, String)>>,
        std::sync::atomic::AtomicBool,
    );

    impl ChatSender for Posted {
        fn active(&self) -> bool {
            !self.1.load(std::sync::atomic::Ordering::Relaxed)
        }

        fn send<'a>(
            &'a self,
            channel: &'a str,
            reply: Reply,
        ) -> crate::adapters::BoxFuture<
            'a,
            Result<crate::adapters::MessageRef, crate::adapters::AdapterError>,
        > {
            self.0
                .lock()
                .expect("posted")
                .push((channel.to_owned(), reply.header));
            Box::pin(async move {
                Ok(crate::adapters::MessageRef {
                    channel: channel.to_owned(),
                    id: "1".into(),
                })
            })
        }
        fn edit<'a>(
            &'a self,
            _msg: &'a crate::adapters::MessageRef,
            _reply: Reply,
        ) -> crate::adapters::BoxFuture<'a, Result<(), crate::adapters::AdapterError>> {
            Box::pin(async { Ok(()) })
        }
    }

    fn gateway(chat: &Arc<Posted>) -> Vec<(String, Arc<dyn ChatSender>)> {
        vec![("irc".into(), chat.clone() as Arc<dyn ChatSender>)]
    }

    /// Two gateways on one chat post an alert once; when the one that won
    /// the claim dies before posting, the other posts it after
    /// `CONFIRM_WAIT`, once (a claim had no owner: the alert was lost).
    #[tokio::test]
    async fn an_alert_is_posted_once_even_when_its_claimer_dies_before_posting() {
        use v1::alert_event::Kind;
        for winner_dies in [false, true] {
            let claims = SharedClaims::default();
            let chat = Arc::new(Posted::default());
            let ev = event(Kind::Transition, "degraded", false);
            let (mut a, mut b) = (Confirmations::default(), Confirmations::default());
            if winner_dies {
                // A claims, then dies before it posts.
                let reply = render(&ev).expect("posted");
                let post = AlertPost::new("irc:#ops", &ev, reply);
                assert!(
                    claims
                        .claim(post.key("alert"), claims::ALERT_TTL)
                        .await
                        .expect("claimed")
                );
            } else {
                post(&claims, &gateway(&chat), &ev, &mut a).await;
            }
            post(&claims, &gateway(&chat), &ev, &mut b).await;
            let posted_at_once = chat.0.lock().expect("posted").len();
            assert_eq!(
                posted_at_once,
                usize::from(!winner_dies),
                "dies {winner_dies}"
            );
            assert!(a.next_due().is_none(), "the winner has nothing to check");
            let due = b.next_due().expect("the loser checks back");
            assert!(due >= tokio::time::Instant::now() + CONFIRM_WAIT - Duration::from_secs(5));
            b.check_due(&claims, &gateway(&chat), due - Duration::from_secs(1))
                .await;
            assert_eq!(
                chat.0.lock().expect("posted").len(),
                posted_at_once,
                "not due yet"
            );
            b.check_due(&claims, &gateway(&chat), due).await;
            assert!(b.next_due().is_none());
            let posted = chat.0.lock().expect("posted").clone();
            assert_eq!(posted.len(), 1, "dies {winner_dies}: {posted:?}");
            assert_eq!(posted[0].0, "irc:#ops");
            assert!(posted[0].1.contains("DEGRADED"), "{posted:?}");
        }
    }

    /// A standby of a connection chat claims nothing and posts nothing;
    /// holding the chat by the time the check is due, it posts an alert
    /// the holder claimed and never posted — and only then.
    #[tokio::test]
    async fn a_standby_posts_an_alert_only_if_it_holds_the_chat_and_nobody_posted() {
        use v1::alert_event::Kind;
        for (holder_posts, holds_by_then) in [(true, true), (false, false), (false, true)] {
            let claims = SharedClaims::default();
            let (holder, standby) = (Arc::new(Posted::default()), Arc::new(Posted::default()));
            standby.1.store(true, std::sync::atomic::Ordering::Relaxed);
            let ev = event(Kind::Transition, "degraded", false);
            let mut pending = Confirmations::default();
            // A gateway without the channel's adapter claims nothing.
            post(&claims, &[], &ev, &mut pending).await;
            assert!(pending.next_due().is_none());
            post(&claims, &gateway(&standby), &ev, &mut pending).await;
            assert!(
                claims.0.lock().expect("claims").is_empty(),
                "a standby claimed"
            );
            if holder_posts {
                post(
                    &claims,
                    &gateway(&holder),
                    &ev,
                    &mut Confirmations::default(),
                )
                .await;
            } else {
                // The holder claims, then dies before it posts.
                let post = AlertPost::new("irc:#ops", &ev, render(&ev).expect("posted"));
                assert!(
                    claims
                        .claim(post.key("alert"), claims::ALERT_TTL)
                        .await
                        .expect("claimed")
                );
            }
            if holds_by_then {
                standby.1.store(false, std::sync::atomic::Ordering::Relaxed);
            }
            let due = pending.next_due().expect("checks back");
            pending.check_due(&claims, &gateway(&standby), due).await;
            let late = standby.0.lock().expect("posted").len();
            let want = usize::from(!holder_posts && holds_by_then);
            assert_eq!(
                late, want,
                "holder posts {holder_posts}, holds {holds_by_then}"
            );
        }
    }

    #[test]
    fn each_failing_instance_is_named_once() {
        use v1::alert_event::Kind;
        for kind in [Kind::Transition, Kind::Reminder] {
            let r = render(&event(kind, "degraded", false)).expect("posted");
            let text = text(&r);
            for host in ["web-2", "web-3"] {
                assert_eq!(text.matches(host).count(), 1, "{host} in {text}");
            }
            insta::assert_snapshot!(format!("alert_{}", kind.as_str_name()), text);
        }
    }

    #[test]
    fn transitions_list_the_failing_instances() {
        use v1::alert_event::Kind;
        let r = render(&event(Kind::Transition, "degraded", false)).expect("posted");
        assert_eq!(
            r.header,
            "[DEGRADED] api is degraded: 1 of 3 instances pass"
        );
        assert_eq!(
            r.lines,
            [
                "  web-2: CRITICAL connection refused",
                "  web-3: agent offline",
                "details: `health api` · mute: `silence api 1h <reason>`",
            ]
        );
    }

    #[test]
    fn snapshots_and_silenced_events_are_not_posted() {
        use v1::alert_event::Kind;
        assert!(render(&event(Kind::Snapshot, "degraded", false)).is_none());
        assert!(render(&event(Kind::Transition, "down", true)).is_none());
        let mut first = event(Kind::Transition, "ok", false);
        first.from = "unknown".into();
        assert!(render(&first).is_none(), "unknown → ok is not news");
        let ok = render(&event(Kind::Transition, "ok", false)).expect("posted");
        assert!(ok.header.starts_with("[RECOVERED]"), "{}", ok.header);
        assert!(ok.lines.is_empty());
        let flap = render(&event(Kind::Flapping, "down", false)).expect("posted");
        assert!(flap.header.starts_with("[FLAPPING]"), "{}", flap.header);
    }
}
