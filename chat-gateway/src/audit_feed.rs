//! The audit channel (issue 6): selected audit events — by
//! default approvals, refusals and policy changes — posted to one chat
//! channel as they happen, so the team sees them without searching.
//!
//! The gateway polls the controller's `Audit.Search` for records newer than
//! the last one it posted (kinds filtered there), newest first, and posts
//! them oldest first in one message per poll. It starts at the current end
//! of the trail: history is not replayed after a restart. With several
//! gateways feeding one channel, each record is posted by the one that
//! claims it at the controller (`crate::claims`).

use std::sync::Arc;
use std::time::Duration;

use fleetcmd_core::audit::{EventKind, ExportLine, Record};
use fleetcmd_proto::v1;
use serde::Deserialize;

use crate::adapters::{ChatSender, CodeBlock, Reply, Section};
use crate::controller::ControllerApi;
use crate::router::Router;

/// Events posted by default.
pub const DEFAULT_KINDS: [EventKind; 11] = [
    EventKind::ApprovalRequested,
    EventKind::ApprovalGiven,
    EventKind::ApprovalDenied,
    EventKind::ApprovalExpired,
    EventKind::ApprovalDropped,
    EventKind::ChatDenied,
    EventKind::JobRefused,
    EventKind::PolicyPushed,
    EventKind::PolicyRefused,
    EventKind::AgentRevoked,
    EventKind::CertRevoked,
];
/// Lines in one post; the rest is summarized with a search hint.
pub const MAX_LINES: usize = 20;

/// `[audit_channel]` in `gateway.toml`.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuditChannelConfig {
    /// Where to post, in the adapter's channel form (`slack:T1:C2`,
    /// `irc:libera:#ops-audit`, …); its scheme picks the adapter.
    pub channel: String,
    /// Event kinds to post (default: approvals, refusals, policy changes,
    /// revocations).
    #[serde(default)]
    pub kinds: Vec<String>,
    /// How often to look for new events.
    #[serde(default = "default_interval")]
    pub interval: String,
}

fn default_interval() -> String {
    "2s".into()
}

impl AuditChannelConfig {
    /// The kinds to post, or every problem with them.
    pub fn kinds(&self) -> Result<Vec<EventKind>, Vec<(String, String)>> {
        if self.kinds.is_empty() {
            return Ok(DEFAULT_KINDS.to_vec());
        }
        let mut out = Vec::new();
        let mut bad = Vec::new();
        for (i, k) in self.kinds.iter().enumerate() {
            match EventKind::parse(k) {
                Ok(k) => out.push(k),
                Err(e) => bad.push((format!("audit_channel.kinds[{i}]"), e)),
            }
        }
        if bad.is_empty() { Ok(out) } else { Err(bad) }
    }

    /// Every problem, keyed `audit_channel.KEY`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = self.kinds().err().unwrap_or_default();
        if !self.channel.contains(':') {
            p.push((
                "audit_channel.channel".into(),
                "expected an adapter's channel form, e.g. slack:T0001:C0AUDIT".into(),
            ));
        }
        match fleetcmd_core::duration::parse_duration(&self.interval) {
            Ok(d) if d >= Duration::from_millis(100) && d <= Duration::from_secs(600) => {}
            Ok(_) => p.push((
                "audit_channel.interval".into(),
                "must be between 100ms and 10m".into(),
            )),
            Err(e) => p.push(("audit_channel.interval".into(), e)),
        }
        p
    }

    pub fn interval(&self) -> Duration {
        fleetcmd_core::duration::parse_duration(&self.interval).unwrap_or(Duration::from_secs(2))
    }
}

fn parse(records: &[String]) -> Vec<Record> {
    records
        .iter()
        .filter_map(|l| match serde_json::from_str::<ExportLine>(l) {
            Ok(ExportLine::Record(r)) => Some(r),
            _ => None,
        })
        .collect()
}

/// The post for `records` (oldest first).
pub fn render(records: &[Record]) -> Reply {
    let shown: Vec<String> = records.iter().take(MAX_LINES).map(Record::line).collect();
    let mut reply = Reply::text(format!(
        "audit: {} new event{}",
        records.len(),
        if records.len() == 1 { "" } else { "s" }
    ));
    if records.len() > MAX_LINES {
        reply.lines.push(format!(
            "showing the first {MAX_LINES}; `audit since:10m` for all"
        ));
    }
    reply.sections.push(Section {
        blocks: vec![CodeBlock {
            label: String::new(),
            text: shown.join("\n"),
            omitted_lines: 0,
        }],
        ..Section::default()
    });
    reply
}

/// Posts new events of `kinds` to `channel` through `out`, every
/// `interval`, until the task is dropped.
pub async fn run<C: ControllerApi>(
    router: Arc<Router<C>>,
    out: Arc<dyn ChatSender>,
    channel: String,
    kinds: Vec<EventKind>,
    interval: Duration,
) {
    let ctl = router.controller();
    let kind_names: Vec<String> = kinds.iter().map(|k| k.as_str().to_string()).collect();
    // Start at the end of the trail (any kind), so nothing old is replayed.
    let mut last_seq = loop {
        match ctl
            .audit_search(v1::AuditSearchRequest {
                limit: 1,
                ..Default::default()
            })
            .await
        {
            Ok(resp) => break parse(&resp.records).first().map_or(0, |r| r.seq),
            Err(e) => {
                tracing::warn!(error = %e, "audit channel: the controller is not answering yet");
                tokio::time::sleep(interval).await;
            }
        }
    };
    let mut since_ms = 0u64;
    loop {
        tokio::time::sleep(interval).await;
        let req = v1::AuditSearchRequest {
            kinds: kind_names.clone(),
            since_ms,
            limit: 1000,
            ..Default::default()
        };
        let mut fresh: Vec<Record> = match ctl.audit_search(req).await {
            Ok(resp) => parse(&resp.records)
                .into_iter()
                .filter(|r| r.seq > last_seq)
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "audit channel: search failed");
                continue;
            }
        };
        if fresh.is_empty() {
            continue;
        }
        fresh.sort_by_key(|r| r.seq);
        if let Some(newest) = fresh.last() {
            last_seq = newest.seq;
            since_ms = newest.time_ms;
        }
        // A standby of a connection chat leaves them to the holder.
        if !out.active() {
            continue;
        }
        // Several gateways may feed this channel: each record is posted by
        // the one that claims it (`crate::claims`); when the claim cannot
        // be made it is posted anyway.
        let mut mine = Vec::with_capacity(fresh.len());
        for r in fresh {
            let key = crate::claims::key("audit", &[&channel, &r.seq.to_string()]);
            match crate::claims::Arbiter::claim(ctl, key, crate::claims::ALERT_TTL).await {
                Ok(false) => {}
                Ok(true) => mine.push(r),
                Err(e) => {
                    tracing::warn!(error = %e, seq = r.seq, "audit channel: cannot claim the record among the gateways; posting it anyway");
                    mine.push(r);
                }
            }
        }
        if mine.is_empty() {
            continue;
        }
        if let Err(e) = out.send(&channel, render(&mine)).await {
            tracing::warn!(error = %e, %channel, "audit channel: post failed");
        }
    }
}

impl crate::registry::Component for AuditChannelConfig {
    const NAME: &'static str = "audit_channel";

    fn validate(&self) -> Vec<(String, String)> {
        AuditChannelConfig::validate(self)
    }

    async fn build(self, cx: &mut crate::registry::BuildContext) -> Result<(), String> {
        let scheme = self.channel.split(':').next().unwrap_or_default();
        // Outgoing webhooks are posted by the `webhook` platform.
        let scheme = if scheme == "webhook-out" {
            "webhook"
        } else {
            scheme
        };
        let senders = cx.senders();
        let Some((_, out)) = senders.iter().find(|(s, _)| s == scheme) else {
            return Err(format!(
                "{}: no enabled adapter posts to `{scheme}:` channels",
                self.channel
            ));
        };
        let kinds = self.kinds().map_err(|p| format!("{p:?}"))?;
        let task = run(
            cx.router().clone(),
            out.clone(),
            self.channel.clone(),
            kinds,
            self.interval(),
        );
        cx.background(task);
        Ok(())
    }
}
