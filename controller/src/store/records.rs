//! The records the store keeps, and their encodings shared by backends
//! that store bytes (sled; a SQL backend may use columns instead).

use std::collections::BTreeMap;

use fleetcmd_core::state::{JobState, Stop, TargetState, UnknownState};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::StoreError;

/// Byte fields are stored as base64 text, not JSON arrays of numbers (which
/// would take two to four bytes per byte of command output).
mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }

    pub mod opt {
        use super::*;

        pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(b) => super::serialize(b, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|t| {
                    base64::engine::general_purpose::STANDARD
                        .decode(t)
                        .map_err(serde::de::Error::custom)
                })
                .transpose()
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenRecord {
    /// Hex SHA-256 of the token secret; the secret itself is never stored.
    pub secret_hash: String,
    pub expires_at: u64,
    pub uses_left: u32,
    pub labels: BTreeMap<String, String>,
    pub name: Option<String>,
    pub created_by: String,
    /// For a token naming an agent that was enrolled when the token was
    /// created: that enrolment's `joined_at`. The token re-enrols exactly
    /// that enrolment (the one its creator's rights were checked against);
    /// `None`: the name was free, and the token takes no enrolled name.
    #[serde(default)]
    pub replaces: Option<u64>,
}

/// Why a token could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("unknown join token")]
    Unknown,
    #[error("join token expired")]
    Expired,
    #[error("join token already used")]
    Used,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentRecord {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub revoked: bool,
    pub joined_at: u64,
    #[serde(default)]
    pub version: String,
    /// The certificate of the last enrolment (`None` in records written
    /// before it was kept): earlier certificates for the name are refused.
    #[serde(default)]
    pub enrolment_cert: Option<crate::pki::EnrolmentCert>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobRecord {
    pub id: String,
    #[serde(with = "b64")]
    pub spec: Vec<u8>,
    #[serde(with = "b64")]
    pub signature: Vec<u8>,
    pub key_id: String,
    pub command: String,
    pub args: BTreeMap<String, String>,
    pub selector: String,
    pub requester: String,
    pub channel: String,
    pub created_at_ms: u64,
    /// Unix seconds after which unfinished targets are failed.
    pub deadline: u64,
    pub state: JobState,
    pub targets: Vec<String>,
    /// Rollout the requester signed (batch, error budget, canaries).
    #[serde(default)]
    pub rollout: fleetcmd_core::job::Rollout,
    #[serde(default)]
    pub needs_approval: bool,
    /// Seconds a dispatched target may take before it is failed (the
    /// command's timeout, or the job's if shorter, plus a grace).
    #[serde(default)]
    pub target_deadline_secs: u64,
    /// The spec's `expires_at`: pending targets cannot start after it.
    #[serde(default)]
    pub expires_at: u64,
    /// Set when the job was aborted, canceled or expired, with the reason.
    #[serde(default)]
    pub stopped: Option<(Stop, String)>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TargetRecord {
    pub state: TargetState,
    /// The agent's `JobResult`, protobuf-encoded, once it arrived.
    #[serde(with = "b64::opt", default)]
    pub result: Option<Vec<u8>>,
    pub reason: String,
    /// Unix seconds when it was dispatched (0 = not yet).
    #[serde(default)]
    pub dispatched_at: u64,
}

impl TargetRecord {
    pub fn new(state: TargetState, reason: &str) -> TargetRecord {
        TargetRecord {
            state,
            result: None,
            reason: reason.into(),
            dispatched_at: 0,
        }
    }
}

#[cfg(any(test, feature = "conformance"))]
impl JobRecord {
    /// A job record for tests: `uptime` on `targets` by cli:alice, a 1 KB
    /// spec, no deadlines.
    pub fn for_test(id: &str, created_at_ms: u64, state: JobState, targets: &[&str]) -> Self {
        JobRecord {
            id: id.into(),
            spec: vec![b'x'; 1000],
            signature: Vec::new(),
            key_id: "k".into(),
            command: "uptime".into(),
            args: BTreeMap::new(),
            selector: "all".into(),
            requester: "cli:alice".into(),
            channel: "cli:alice".into(),
            created_at_ms,
            deadline: 0,
            state,
            targets: targets.iter().map(|t| t.to_string()).collect(),
            rollout: Default::default(),
            needs_approval: false,
            target_deadline_secs: 0,
            expires_at: 0,
            stopped: None,
        }
    }
}

/// Target records are the most written records (one or two per target of
/// every job), so they are stored compactly: a format byte, then protobuf
/// (the result inside is protobuf already, no base64). Records written as
/// JSON by earlier versions (first byte `{`) are still read.
pub(crate) const TARGET_V2: u8 = 2;

#[derive(Clone, PartialEq, prost::Message)]
struct TargetWire {
    #[prost(string, tag = "1")]
    state: String,
    #[prost(bytes = "vec", optional, tag = "2")]
    result: Option<Vec<u8>>,
    #[prost(string, tag = "3")]
    reason: String,
    #[prost(uint64, tag = "4")]
    dispatched_at: u64,
}

pub(crate) fn encode_target(rec: &TargetRecord) -> Vec<u8> {
    use prost::Message;
    let wire = TargetWire {
        state: rec.state.as_str().to_owned(),
        result: rec.result.clone(),
        reason: rec.reason.clone(),
        dispatched_at: rec.dispatched_at,
    };
    let mut out = Vec::with_capacity(1 + wire.encoded_len());
    out.push(TARGET_V2);
    wire.encode(&mut out)
        .expect("a Vec grows to fit any protobuf message");
    out
}

pub(crate) fn decode_target(key: &[u8], bytes: &[u8]) -> Result<TargetRecord, StoreError> {
    use prost::Message;
    match bytes.split_first() {
        Some((&TARGET_V2, rest)) => {
            let w = TargetWire::decode(rest).map_err(|e| StoreError::Corrupt {
                key: String::from_utf8_lossy(key).into_owned(),
                reason: e.to_string(),
            })?;
            let state = w
                .state
                .parse()
                .map_err(|e: UnknownState| StoreError::Corrupt {
                    key: String::from_utf8_lossy(key).into_owned(),
                    reason: e.to_string(),
                })?;
            Ok(TargetRecord {
                state,
                result: w.result,
                reason: w.reason,
                dispatched_at: w.dispatched_at,
            })
        }
        // Written by a version before the compact format.
        _ => decode(key, bytes),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PolicyRecord {
    pub version: u64,
    pub bundle: Vec<u8>,
    /// (key id, signature) pairs.
    pub signatures: Vec<(String, Vec<u8>)>,
}

/// What was last announced for one service or `HOST/CHECK`, and its
/// silence: survives a restart so an alert is neither repeated nor a
/// silence forgotten.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HealthRecord {
    pub state: String,
    pub since_ms: u64,
    #[serde(default)]
    pub silenced_until_ms: u64,
    #[serde(default)]
    pub silence_reason: String,
    #[serde(default)]
    pub silenced_by: String,
}

/// One announced state change of a service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HealthTransition {
    pub from: String,
    pub to: String,
    pub at_ms: u64,
    pub passing: u32,
    pub total: u32,
}

/// JSON, the encoding of every record but targets and audit records.
pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("store records serialize to JSON")
}

pub(crate) fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}
