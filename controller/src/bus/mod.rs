//! The bus between controllers that share one database: small wake-ups
//! ("job J changed", "agent A changed", "the policy changed") that every
//! controller sends after it made a change durable, and every controller
//! (itself included) follows (`state::follow`). The store is the truth: a
//! signal carries no state, only which part to read again, so a lost
//! signal costs latency, never correctness — after the listener
//! (re)connects it delivers [`Signal::Resync`], and each controller also
//! scans the store for running jobs every [`SCAN_EVERY`].
//!
//! With one controller (the embedded store) there is no bus: [`Bus::none`]
//! drops what is published, and everything happens in process as before.
//! `postgres`: PostgreSQL `LISTEN`/`NOTIFY` on the channel [`CHANNEL`].
//!
//! Architecture invariant: the bus knows no job, agent or policy logic; it
//! carries names. What a signal means is decided in `state::follow`.

pub mod postgres;

use std::time::Duration;

use base64::Engine as _;
use fleetcmd_proto::v1 as pb;
use prost::Message as _;
use tokio::sync::mpsc;

/// The PostgreSQL notification channel.
pub const CHANNEL: &str = "fleetcmd";
/// How often each controller looks at the store's running jobs for work
/// a lost signal would have announced.
pub const SCAN_EVERY: Duration = Duration::from_secs(2);
/// Signals waiting to be sent. When full, a signal is dropped (counted in
/// the log at debug level): the periodic scan catches up what it announced.
pub const OUTBOX: usize = 4096;
/// Signals received and not yet followed; when full the listener waits
/// (backpressure on one connection, the database buffers the rest).
pub const INBOX: usize = 4096;
/// PostgreSQL refuses payloads of 8000 bytes or more; a live output
/// chunk whose signal would be longer is not forwarded (its lines are in
/// the result when the target ends).
pub const MAX_PAYLOAD: usize = 7900;

/// What changed, by name.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    /// A job was created, canceled or finished: read it again, dispatch
    /// what is for agents connected here.
    Job(String),
    /// One target of a job changed (a result, a deadline): watchers here
    /// read it from the store; the job may advance.
    Target { job: String, agent: String },
    /// An agent was enrolled, enrolled again or revoked: read its record.
    Agent(String),
    /// A policy was pushed: read, verify and forward it.
    Policy,
    /// An operator or gateway certificate was revoked.
    CertRevoked,
    /// A line of live output, for watchers on other controllers (not
    /// stored: best effort, like a watcher that lags).
    Output(pb::OutputChunk),
    /// A service alert announced by the `health` lease holder, for the
    /// alert watchers (gateways) on every controller; its instances
    /// trimmed to the failing ones that fit (`Health::forwarded`).
    Alert(Box<pb::AlertEvent>),
    /// Signals may have been missed (the listener connected again): read
    /// everything again.
    Resync,
}

/// A payload that is not a signal of this version.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("bus payload {payload:?}: {why}")]
pub struct BadSignal {
    payload: String,
    why: &'static str,
}

impl Signal {
    /// The payload: a kind letter, `:`, its names.
    pub fn encode(&self) -> String {
        match self {
            Signal::Job(id) => format!("j:{id}"),
            Signal::Target { job, agent } => format!("t:{job}:{agent}"),
            Signal::Agent(id) => format!("a:{id}"),
            Signal::Policy => "p:".into(),
            Signal::CertRevoked => "c:".into(),
            Signal::Output(chunk) => format!(
                "o:{}",
                base64::engine::general_purpose::STANDARD_NO_PAD.encode(chunk.encode_to_vec())
            ),
            Signal::Alert(ev) => format!(
                "l:{}",
                base64::engine::general_purpose::STANDARD_NO_PAD.encode(ev.encode_to_vec())
            ),
            Signal::Resync => "r:".into(),
        }
    }

    pub fn parse(payload: &str) -> Result<Signal, BadSignal> {
        let bad = |why| BadSignal {
            payload: payload.chars().take(80).collect(),
            why,
        };
        let (kind, rest) = payload.split_once(':').ok_or_else(|| bad("no kind"))?;
        let name = |s: &str| {
            if s.is_empty() || s.len() > 256 || s.contains(':') {
                Err(bad("a name is empty, too long or has a colon"))
            } else {
                Ok(s.to_owned())
            }
        };
        match kind {
            "j" => Ok(Signal::Job(name(rest)?)),
            "t" => {
                let (job, agent) = rest.split_once(':').ok_or_else(|| bad("no agent"))?;
                Ok(Signal::Target {
                    job: name(job)?,
                    agent: name(agent)?,
                })
            }
            "a" => Ok(Signal::Agent(name(rest)?)),
            "p" if rest.is_empty() => Ok(Signal::Policy),
            "c" if rest.is_empty() => Ok(Signal::CertRevoked),
            "r" if rest.is_empty() => Ok(Signal::Resync),
            "o" => {
                let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
                    .decode(rest)
                    .map_err(|_| bad("output is not base64"))?;
                let chunk =
                    pb::OutputChunk::decode(bytes.as_slice()).map_err(|_| bad("output chunk"))?;
                Ok(Signal::Output(chunk))
            }
            "l" => {
                let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
                    .decode(rest)
                    .map_err(|_| bad("alert is not base64"))?;
                let ev =
                    pb::AlertEvent::decode(bytes.as_slice()).map_err(|_| bad("alert event"))?;
                Ok(Signal::Alert(Box::new(ev)))
            }
            _ => Err(bad("unknown kind")),
        }
    }
}

/// The sending half every part that changes shared state holds.
#[derive(Clone, Debug)]
pub struct Bus {
    outbox: Option<mpsc::Sender<String>>,
}

impl Bus {
    /// One controller: nothing to tell anyone.
    pub fn none() -> Bus {
        Bus { outbox: None }
    }

    /// Whether other controllers may share the store (dispatch then claims
    /// each target in the store before it sends it).
    pub fn is_shared(&self) -> bool {
        self.outbox.is_some()
    }

    /// Queues `signal` for every controller. Call it after the change it
    /// announces is durable. Never waits: a full outbox drops it (see
    /// [`OUTBOX`]).
    pub fn publish(&self, signal: Signal) {
        let Some(tx) = &self.outbox else { return };
        let payload = signal.encode();
        if payload.len() > MAX_PAYLOAD {
            tracing::debug!(len = payload.len(), "bus signal too long; not sent");
            return;
        }
        if tx.try_send(payload).is_err() {
            tracing::debug!("bus outbox full; the periodic scan catches up");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_round_trip_and_bad_payloads_are_named() {
        let chunk = pb::OutputChunk {
            job_id: "j1".into(),
            agent_id: "web-1".into(),
            data: b"line\n".to_vec(),
            ..Default::default()
        };
        for s in [
            Signal::Job("0190ab12-34cd-7ef0-8123-456789abcdef".into()),
            Signal::Target {
                job: "0190ab12".into(),
                agent: "web-1".into(),
            },
            Signal::Agent("web-1".into()),
            Signal::Policy,
            Signal::CertRevoked,
            Signal::Output(chunk),
            Signal::Alert(Box::new(pb::AlertEvent {
                kind: pb::alert_event::Kind::Transition as i32,
                service: Some(pb::Service {
                    name: "web".into(),
                    state: "down".into(),
                    ..Default::default()
                }),
                from: "ok".into(),
                summary: "web is down".into(),
                ..Default::default()
            })),
            Signal::Resync,
        ] {
            assert_eq!(Signal::parse(&s.encode()), Ok(s.clone()), "{s:?}");
        }
        for (payload, why) in [
            ("", "no kind"),
            ("x:1", "unknown kind"),
            ("j:", "a name is empty, too long or has a colon"),
            ("t:job", "no agent"),
            ("t:job:a:b", "a name is empty, too long or has a colon"),
            ("p:extra", "unknown kind"),
            ("o:!!", "output is not base64"),
        ] {
            let err = Signal::parse(payload).expect_err(payload);
            assert_eq!(err.why, why, "{payload}");
            assert!(err.to_string().contains("bus payload"), "{err}");
        }
    }

    #[test]
    fn without_a_shared_store_publishing_is_a_no_op() {
        let bus = Bus::none();
        assert!(!bus.is_shared());
        bus.publish(Signal::Policy);
    }
}
