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
//! posted anyway: an alert posted twice is better than none.

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
        while let Some(item) = stream.next().await {
            let ev = match item {
                Ok(ev) => ev,
                Err(e) => {
                    tracing::warn!(error = %e, "alerts: health stream failed");
                    break;
                }
            };
            backoff = BACKOFF_MIN;
            if let Some(tx) = &integrations
                && tx.try_send(ev.clone()).is_err()
            {
                tracing::warn!("alerts: integrations are behind; dropped one event");
            }
            post(ctl, &senders, &ev).await;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn post(
    arbiter: &dyn Arbiter,
    senders: &[(String, Arc<dyn ChatSender>)],
    ev: &v1::AlertEvent,
) {
    let (Some(reply), Some(s)) = (render(ev), ev.service.as_ref()) else {
        return;
    };
    for channel in &s.channels {
        let scheme = channel.split(':').next().unwrap_or_default();
        let Some((_, out)) = senders.iter().find(|(name, _)| name == scheme) else {
            tracing::warn!(
                service = %s.name,
                %channel,
                "alerts: no enabled adapter posts to this channel"
            );
            continue;
        };
        // A standby of a connection chat leaves it to the holder.
        if !out.active() || !first_to_post(arbiter, channel, ev).await {
            continue;
        }
        if let Err(e) = out.send(channel, reply.clone()).await {
            tracing::warn!(service = %s.name, %channel, error = %e, "alerts: post failed");
        }
    }
}

/// Whether this gateway posts `ev` to `channel`: it claimed the post, or
/// the claim could not be made (posted anyway; logged).
async fn first_to_post(arbiter: &dyn Arbiter, channel: &str, ev: &v1::AlertEvent) -> bool {
    let s = ev.service.as_ref();
    let name = s.map(|s| s.name.as_str()).unwrap_or_default();
    let state = s.map(|s| s.state.as_str()).unwrap_or_default();
    let (kind, at) = (ev.kind.to_string(), ev.at_ms.to_string());
    let key = claims::key("alert", &[channel, name, &kind, &ev.from, state, &at]);
    match arbiter.claim(key, claims::ALERT_TTL).await {
        Ok(true) => true,
        Ok(false) => {
            tracing::info!(service = name, %channel, "alerts: posted by another gateway");
            false
        }
        Err(e) => {
            tracing::warn!(service = name, %channel, error = %e, "alerts: cannot claim the post among the gateways; posting it anyway");
            true
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
