//! The audit trail's pure half: the typed security events, the
//! record that carries one event in the chain, its canonical encoding, the
//! hash chain (`hash = SHA-256(prev_hash ‖ canonical record)`), signed chain
//! heads, verification that names the first bad record, and search filters.
//!
//! Storage, clocks and keys on disk live in the controller; here time is
//! passed in and nothing is read or written.
//!
//! ```
//! use fleetcmd_core::audit::{Chain, Event, EventKind, verify_chain, VerifyOptions};
//! let mut chain = Chain::genesis();
//! let r1 = chain.append(1_000, Event::new(EventKind::TokenCreated, "operator admin"));
//! let r2 = chain.append(2_000, Event::new(EventKind::AgentJoined, "agent web-1"));
//! let report = verify_chain([r1, r2].into_iter().map(Ok::<_, std::convert::Infallible>), &[], None, &VerifyOptions::default());
//! assert_eq!(report.unwrap().records, 2);
//! ```

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::crypto::{PublicKey, SigningKey, sha256, verify};
use crate::join_token::hex;

/// Every kind of audited event. The names (`as_str`) are stable: they are
/// stored, searched and exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    AgentJoined,
    AgentRenewed,
    AgentRevoked,
    TokenCreated,
    TokenUsed,
    TokenRefused,
    PolicyPushed,
    PolicyRefused,
    JobSubmitted,
    /// Refused by the controller at submit (bad signature, stale, replay, …).
    JobRefused,
    JobDispatched,
    JobRefusedByAgent,
    /// One host's result (exit status, duration, output size).
    JobFinished,
    JobCanceled,
    ApprovalRequested,
    ApprovalGiven,
    ApprovalDenied,
    ApprovalExpired,
    /// A pending approval ended without a decision: the policy changed
    /// under it, its record was unreadable, or its adapter is gone.
    ApprovalDropped,
    ChatDenied,
    /// A call without a certificate, with the wrong role, or by a revoked
    /// identity; bad chat signatures and webhook HMACs.
    AuthFailed,
    /// A service's announced health state changed (after flap damping).
    ServiceChanged,
    /// A service's alerts were silenced (or the silence lifted).
    ServiceSilenced,
    /// An operator or gateway certificate was revoked.
    CertRevoked,
    /// An authenticated caller was refused an action its policy roles do
    /// not grant (reading another's job, a token for other labels, …).
    PermissionDenied,
    /// A chat command an integration or plugin registered was called
    /// (who, which verb, where, and the outcome in `detail`).
    ChatCommand,
}

impl EventKind {
    pub const ALL: &'static [EventKind] = &[
        EventKind::AgentJoined,
        EventKind::AgentRenewed,
        EventKind::AgentRevoked,
        EventKind::TokenCreated,
        EventKind::TokenUsed,
        EventKind::TokenRefused,
        EventKind::PolicyPushed,
        EventKind::PolicyRefused,
        EventKind::JobSubmitted,
        EventKind::JobRefused,
        EventKind::JobDispatched,
        EventKind::JobRefusedByAgent,
        EventKind::JobFinished,
        EventKind::JobCanceled,
        EventKind::ApprovalRequested,
        EventKind::ApprovalGiven,
        EventKind::ApprovalDenied,
        EventKind::ApprovalExpired,
        EventKind::ApprovalDropped,
        EventKind::ChatDenied,
        EventKind::AuthFailed,
        EventKind::ServiceChanged,
        EventKind::ServiceSilenced,
        EventKind::CertRevoked,
        EventKind::PermissionDenied,
        EventKind::ChatCommand,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::AgentJoined => "agent_joined",
            EventKind::AgentRenewed => "agent_renewed",
            EventKind::AgentRevoked => "agent_revoked",
            EventKind::TokenCreated => "token_created",
            EventKind::TokenUsed => "token_used",
            EventKind::TokenRefused => "token_refused",
            EventKind::PolicyPushed => "policy_pushed",
            EventKind::PolicyRefused => "policy_refused",
            EventKind::JobSubmitted => "job_submitted",
            EventKind::JobRefused => "job_refused",
            EventKind::JobDispatched => "job_dispatched",
            EventKind::JobRefusedByAgent => "job_refused_by_agent",
            EventKind::JobFinished => "job_finished",
            EventKind::JobCanceled => "job_canceled",
            EventKind::ApprovalRequested => "approval_requested",
            EventKind::ApprovalGiven => "approval_given",
            EventKind::ApprovalDenied => "approval_denied",
            EventKind::ApprovalExpired => "approval_expired",
            EventKind::ApprovalDropped => "approval_dropped",
            EventKind::ChatDenied => "chat_denied",
            EventKind::AuthFailed => "auth_failed",
            EventKind::ServiceChanged => "service_changed",
            EventKind::ServiceSilenced => "service_silenced",
            EventKind::CertRevoked => "cert_revoked",
            EventKind::PermissionDenied => "permission_denied",
            EventKind::ChatCommand => "chat_command",
        }
    }

    pub fn parse(s: &str) -> Result<EventKind, String> {
        EventKind::ALL
            .iter()
            .copied()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown audit event kind {s:?}; known: {}",
                    EventKind::ALL
                        .iter()
                        .map(|k| k.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }

    /// Refusals and failures: logged as warnings, shown as security events.
    pub fn is_refusal(self) -> bool {
        matches!(
            self,
            EventKind::TokenRefused
                | EventKind::PolicyRefused
                | EventKind::JobRefused
                | EventKind::JobRefusedByAgent
                | EventKind::ApprovalDenied
                | EventKind::ChatDenied
                | EventKind::AuthFailed
                | EventKind::AgentRevoked
                | EventKind::CertRevoked
                | EventKind::PermissionDenied
        )
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One audited event, flat so that it searches well. `fields` carries what
/// is specific to a kind (versions and hash of a policy, args and target
/// count of a job, exit status and duration of a result).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    /// Who acted: `operator admin`, `gateway main`, `agent web-1`,
    /// `slack:T1:U2`, or `anonymous`.
    pub actor: String,
    /// Where from: a peer address or a chat channel.
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub job_id: String,
    #[serde(default)]
    pub command: String,
    /// The hosts the event is about.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// A short human sentence; refusals carry their reason here.
    #[serde(default)]
    pub detail: String,
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
}

impl Event {
    pub fn new(kind: EventKind, actor: impl Into<String>) -> Event {
        Event {
            kind,
            actor: actor.into(),
            source: String::new(),
            job_id: String::new(),
            command: String::new(),
            hosts: Vec::new(),
            detail: String::new(),
            fields: BTreeMap::new(),
        }
    }
    pub fn detail(mut self, d: impl Into<String>) -> Event {
        self.detail = d.into();
        self
    }
    pub fn source(mut self, s: impl Into<String>) -> Event {
        self.source = s.into();
        self
    }
    pub fn job(mut self, id: impl Into<String>) -> Event {
        self.job_id = id.into();
        self
    }
    pub fn command(mut self, c: impl Into<String>) -> Event {
        self.command = c.into();
        self
    }
    pub fn host(mut self, h: impl Into<String>) -> Event {
        self.hosts.push(h.into());
        self
    }
    pub fn hosts(mut self, hs: impl IntoIterator<Item = impl Into<String>>) -> Event {
        self.hosts.extend(hs.into_iter().map(Into::into));
        self
    }
    pub fn field(mut self, k: impl Into<String>, v: impl ToString) -> Event {
        self.fields.insert(k.into(), v.to_string());
        self
    }
}

/// Hex SHA-256, as stored.
pub type HashHex = String;

/// The hash before the first record.
pub fn genesis_hash() -> HashHex {
    hex(&[0u8; 32])
}

/// One record of the trail: an event at a place in the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    /// Unix milliseconds; never decreases along the chain.
    pub time_ms: u64,
    pub event: Event,
    pub prev_hash: HashHex,
    pub hash: HashHex,
}

#[derive(Serialize)]
struct Canonical<'a> {
    v: u32,
    seq: u64,
    time_ms: u64,
    event: &'a Event,
}

impl Record {
    /// One line for people: `seq time kind actor via source cmd= job= hosts= fields — detail`
    /// (`job=` the short id).
    pub fn line(&self) -> String {
        let r = self;
        let e = &r.event;
        let time = time::OffsetDateTime::from_unix_timestamp_nanos(r.time_ms as i128 * 1_000_000)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| r.time_ms.to_string());
        let mut s = format!("{:>6} {time} {:<20} {}", r.seq, e.kind.as_str(), e.actor);
        if !e.source.is_empty() {
            s.push_str(&format!(" via {}", e.source));
        }
        if !e.command.is_empty() {
            s.push_str(&format!(" cmd={}", e.command));
        }
        if !e.job_id.is_empty() {
            // The short id, as chat and the CLI show it; JSON keeps the full id.
            s.push_str(&format!(" job={}", crate::ids::short_form(&e.job_id)));
        }
        if !e.hosts.is_empty() {
            s.push_str(&format!(" hosts={}", e.hosts.join(",")));
        }
        for (k, v) in &e.fields {
            s.push_str(&format!(" {k}={v}"));
        }
        if !e.detail.is_empty() {
            s.push_str(&format!(" — {}", e.detail));
        }
        s
    }

    /// The bytes the hash covers (besides `prev_hash`): versioned JSON with a
    /// fixed field order (struct order; `fields` is a sorted map).
    pub fn canonical(&self) -> Vec<u8> {
        canonical(self.seq, self.time_ms, &self.event)
    }

    /// What `hash` must be for these contents.
    pub fn expected_hash(&self) -> HashHex {
        chain_hash(&self.prev_hash, &self.canonical())
    }

    /// Whether `text`, case-insensitively, occurs anywhere in the event.
    fn contains_text(&self, needle_lower: &str) -> bool {
        let e = &self.event;
        let hit = |s: &str| s.to_lowercase().contains(needle_lower);
        hit(e.kind.as_str())
            || hit(&e.actor)
            || hit(&e.source)
            || hit(&e.job_id)
            || hit(&e.command)
            || hit(&e.detail)
            || e.hosts.iter().any(|h| hit(h))
            || e.fields.iter().any(|(k, v)| hit(k) || hit(v))
    }
}

fn canonical(seq: u64, time_ms: u64, event: &Event) -> Vec<u8> {
    serde_json::to_vec(&Canonical {
        v: 1,
        seq,
        time_ms,
        event,
    })
    .expect("audit events serialize to JSON")
}

fn chain_hash(prev_hex: &str, canonical: &[u8]) -> HashHex {
    let mut buf = Vec::with_capacity(32 + canonical.len());
    buf.extend_from_slice(&unhex32(prev_hex).unwrap_or([0xff; 32]));
    buf.extend_from_slice(canonical);
    hex(&sha256(&buf))
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The tip of the chain: what the next record links to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Sequence number of the last record (0 = none yet).
    pub seq: u64,
    pub hash: HashHex,
    pub time_ms: u64,
}

impl Chain {
    pub fn genesis() -> Chain {
        Chain {
            seq: 0,
            hash: genesis_hash(),
            time_ms: 0,
        }
    }

    /// Continues after `last`.
    pub fn after(last: &Record) -> Chain {
        Chain {
            seq: last.seq,
            hash: last.hash.clone(),
            time_ms: last.time_ms,
        }
    }

    /// Makes the next record and advances the tip. Time is clamped so it
    /// never goes backwards along the chain (a clock step back cannot
    /// reorder the trail's time index).
    pub fn append(&mut self, now_ms: u64, event: Event) -> Record {
        let seq = self.seq + 1;
        let time_ms = now_ms.max(self.time_ms);
        let prev_hash = self.hash.clone();
        let hash = chain_hash(&prev_hash, &canonical(seq, time_ms, &event));
        self.seq = seq;
        self.hash = hash.clone();
        self.time_ms = time_ms;
        Record {
            seq,
            time_ms,
            event,
            prev_hash,
            hash,
        }
    }
}

/// A chain head as signed by the controller's audit key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedHead {
    pub seq: u64,
    pub hash: HashHex,
    pub time_ms: u64,
    /// Fingerprint of the audit public key.
    pub key_id: String,
    /// Base64 is not needed: hex of the 64-byte Ed25519 signature.
    pub signature: String,
}

fn head_message(seq: u64, hash: &str, time_ms: u64) -> Vec<u8> {
    format!("fleetcmd-audit-head-v1\n{seq}\n{hash}\n{time_ms}\n").into_bytes()
}

impl SignedHead {
    pub fn sign(chain: &Chain, now_ms: u64, key: &SigningKey) -> SignedHead {
        let sig = key.sign(&head_message(chain.seq, &chain.hash, now_ms));
        SignedHead {
            seq: chain.seq,
            hash: chain.hash.clone(),
            time_ms: now_ms,
            key_id: key.public_key().fingerprint(),
            signature: hex(&sig),
        }
    }

    pub fn signature_ok(&self, key: &PublicKey) -> bool {
        let Some(sig) = unhex(&self.signature) else {
            return false;
        };
        verify(key, &head_message(self.seq, &self.hash, self.time_ms), &sig)
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// One line of an exported trail (JSON lines): a record or a signed head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ExportLine {
    Head { signed_head: SignedHead },
    Record(Record),
}

/// The first thing wrong with a trail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    #[error("record {seq}: {reason}")]
    Record { seq: u64, reason: String },
    #[error("signed head at {seq}: {reason}")]
    Head { seq: u64, reason: String },
    #[error(
        "trail truncated: a signed head covers record {head_seq} but the trail ends at {last_seq}"
    )]
    Truncated { head_seq: u64, last_seq: u64 },
}

impl Broken {
    /// The sequence number of the first bad record (or head).
    pub fn seq(&self) -> u64 {
        match self {
            Broken::Record { seq, .. } | Broken::Head { seq, .. } => *seq,
            Broken::Truncated { last_seq, .. } => last_seq + 1,
        }
    }
}

/// How to verify.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Start here (trusting the record's own `prev_hash` as the anchor):
    /// `--from SEQ`, or the first record kept after a retention prune.
    pub from: Option<u64>,
    /// When set, the hash the first checked record must link to (a signed
    /// retention checkpoint). Without `from`, the genesis hash is required.
    pub anchor: Option<HashHex>,
}

/// What a successful verification covered.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verified {
    pub first: u64,
    pub last: u64,
    pub records: u64,
    pub heads: u64,
    /// The newest record covered by a valid signed head (0 = none): records
    /// after it are chained but not yet signed.
    pub signed_up_to: u64,
}

/// How to verify a trail whose first record is `first_seq`: from the
/// genesis when it starts at 1; after a retention prune (it starts later)
/// from the signed head of the record just before it — the retention
/// checkpoint, which must be present and (with `key`) signed by the audit
/// key. `from` (`--from SEQ`) overrides both and trusts that record's link.
pub fn verify_options(
    first_seq: Option<u64>,
    heads: &[SignedHead],
    key: Option<&PublicKey>,
    from: Option<u64>,
) -> Result<VerifyOptions, Broken> {
    if from.is_some() {
        return Ok(VerifyOptions { from, anchor: None });
    }
    let first = match first_seq {
        None | Some(0) | Some(1) => return Ok(VerifyOptions::default()),
        Some(f) => f,
    };
    let Some(checkpoint) = heads.iter().find(|h| h.seq == first - 1) else {
        return Err(Broken::Record {
            seq: 1,
            reason: format!(
                "records 1..{} are missing and no signed retention checkpoint covers them",
                first - 1
            ),
        });
    };
    if key.is_some_and(|k| !checkpoint.signature_ok(k)) {
        return Err(Broken::Head {
            seq: checkpoint.seq,
            reason: "the retention checkpoint's signature does not verify with the audit key"
                .into(),
        });
    }
    Ok(VerifyOptions {
        from: Some(first),
        anchor: Some(checkpoint.hash.clone()),
    })
}

/// Checks a trail in sequence order: numbering without gaps, each record's
/// link to the previous hash, each record's hash over its contents, and each
/// signed head (signature by `key`, and the record it names has that hash).
/// Names the first bad record. Heads are checked only when `key` is given.
pub fn verify_chain<E: fmt::Display>(
    records: impl IntoIterator<Item = Result<Record, E>>,
    heads: &[SignedHead],
    key: Option<&PublicKey>,
    opts: &VerifyOptions,
) -> Result<Verified, Broken> {
    let mut heads: Vec<&SignedHead> = heads
        .iter()
        .filter(|h| opts.from.is_none_or(|f| h.seq >= f))
        .collect();
    heads.sort_by_key(|h| h.seq);
    if let Some(key) = key
        && let Some(h) = heads.iter().find(|h| !h.signature_ok(key))
    {
        return Err(Broken::Head {
            seq: h.seq,
            reason: "signature does not verify with the audit key".into(),
        });
    }
    let mut out = Verified::default();
    let mut expect_seq = opts.from.unwrap_or(1).max(1);
    let mut prev: Option<HashHex> = match (&opts.anchor, opts.from) {
        (Some(a), _) => Some(a.clone()),
        (None, None) => Some(genesis_hash()),
        (None, Some(_)) => None, // trust the first record's own link
    };
    let mut hi = 0;
    let mut last_time = 0;
    for r in records {
        let r = r.map_err(|e| Broken::Record {
            seq: expect_seq,
            reason: format!("unreadable: {e}"),
        })?;
        if r.seq < expect_seq && out.records == 0 && opts.from.is_some() {
            continue; // before --from
        }
        if r.seq != expect_seq {
            let reason = if r.seq > expect_seq {
                format!(
                    "missing (the next record found is {}): removed or reordered",
                    r.seq
                )
            } else {
                format!(
                    "missing: record {} found in its place (reordered or duplicated)",
                    r.seq
                )
            };
            return Err(Broken::Record {
                seq: expect_seq,
                reason,
            });
        }
        if let Some(p) = &prev
            && &r.prev_hash != p
        {
            return Err(Broken::Record {
                    seq: r.seq,
                    reason: "does not link to the previous record's hash (a record before it was inserted, removed or replaced)".into(),
                });
        }
        if r.expected_hash() != r.hash {
            return Err(Broken::Record {
                seq: r.seq,
                reason: "its hash does not match its contents (edited)".into(),
            });
        }
        if r.time_ms < last_time {
            return Err(Broken::Record {
                seq: r.seq,
                reason: "its time is before the previous record's".into(),
            });
        }
        last_time = r.time_ms;
        while hi < heads.len() && heads[hi].seq < r.seq {
            // A head for a record we skipped (`from`) or never saw.
            hi += 1;
        }
        while hi < heads.len() && heads[hi].seq == r.seq {
            if heads[hi].hash != r.hash {
                return Err(Broken::Record {
                    seq: r.seq,
                    reason: "differs from the signed chain head for it (the chain was rewritten)"
                        .into(),
                });
            }
            if key.is_some() {
                out.heads += 1;
                out.signed_up_to = r.seq;
            }
            hi += 1;
        }
        if out.records == 0 {
            out.first = r.seq;
        }
        out.records += 1;
        out.last = r.seq;
        prev = Some(r.hash.clone());
        expect_seq = r.seq + 1;
    }
    if let Some(h) = heads.last()
        && h.seq > out.last
        && h.seq > 0
    {
        return Err(Broken::Truncated {
            head_seq: h.seq,
            last_seq: out.last,
        });
    }
    Ok(out)
}

/// A search over the trail. Empty fields match everything; all set fields
/// must match (AND).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Case-insensitive substring anywhere in the event.
    pub text: Option<String>,
    /// Exact actor, or a prefix when it ends with `*`.
    pub actor: Option<String>,
    pub command: Option<String>,
    /// One of the event's hosts.
    pub host: Option<String>,
    /// The job: its full id, short id, or a prefix of the full id.
    pub job_id: Option<crate::ids::JobRef>,
    /// Any of these kinds (empty = all).
    pub kinds: Vec<EventKind>,
    /// Inclusive lower bound, unix ms.
    pub since_ms: Option<u64>,
    /// Exclusive upper bound, unix ms.
    pub until_ms: Option<u64>,
}

impl Filter {
    /// Parses a chat `audit` query: `key:value` terms (`actor:` or `by:`,
    /// `command:` or `cmd:`, `host:`, `job:`, `kind:` (repeatable),
    /// `since:`/`until:` as `2h` or RFC 3339) and free text for the rest.
    ///
    /// ```
    /// use fleetcmd_core::audit::Filter;
    /// let f = Filter::parse_query("restart by:slack:T1:U2 since:2h", 10_000_000).unwrap();
    /// assert_eq!(f.text.as_deref(), Some("restart"));
    /// assert_eq!(f.actor.as_deref(), Some("slack:T1:U2"));
    /// assert_eq!(f.since_ms, Some(10_000_000 - 7_200_000));
    /// ```
    pub fn parse_query(query: &str, now_ms: u64) -> Result<Filter, String> {
        let mut f = Filter::default();
        let mut text = Vec::new();
        for term in query.split_whitespace() {
            let Some((key, value)) = term.split_once(':') else {
                text.push(term);
                continue;
            };
            let set = |slot: &mut Option<String>| {
                if value.is_empty() {
                    Err(format!("`{key}:` needs a value"))
                } else {
                    *slot = Some(value.to_string());
                    Ok(())
                }
            };
            match key {
                "actor" | "by" => set(&mut f.actor)?,
                "command" | "cmd" => set(&mut f.command)?,
                "host" => set(&mut f.host)?,
                "job" => {
                    f.job_id =
                        Some(crate::ids::JobRef::parse(value).map_err(|e| format!("`job:` {e}"))?)
                }
                "kind" => f.kinds.push(EventKind::parse(value)?),
                "since" => f.since_ms = Some(crate::duration::parse_time_ms(value, now_ms)?),
                "until" => f.until_ms = Some(crate::duration::parse_time_ms(value, now_ms)?),
                _ => {
                    return Err(format!(
                        "unknown filter `{key}:`; filters are actor:, command:, host:, job:, kind:, since: and until:"
                    ));
                }
            }
        }
        if !text.is_empty() {
            f.text = Some(text.join(" "));
        }
        Ok(f)
    }

    pub fn matches(&self, r: &Record) -> bool {
        let e = &r.event;
        if self.since_ms.is_some_and(|s| r.time_ms < s) {
            return false;
        }
        if self.until_ms.is_some_and(|u| r.time_ms >= u) {
            return false;
        }
        if !self.kinds.is_empty() && !self.kinds.contains(&e.kind) {
            return false;
        }
        if let Some(a) = &self.actor {
            let ok = match a.strip_suffix('*') {
                Some(prefix) => e.actor.starts_with(prefix),
                None => &e.actor == a,
            };
            if !ok {
                return false;
            }
        }
        if self.command.as_ref().is_some_and(|c| &e.command != c) {
            return false;
        }
        if self
            .host
            .as_ref()
            .is_some_and(|h| !e.hosts.iter().any(|x| x == h))
        {
            return false;
        }
        if self.job_id.as_ref().is_some_and(|j| !j.matches(&e.job_id)) {
            return false;
        }
        if let Some(t) = &self.text
            && !r.contains_text(&t.to_lowercase())
        {
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .expect("keygen");
        SigningKey::from_pkcs8_der(doc.as_ref()).expect("key")
    }

    fn trail(n: u64) -> (Vec<Record>, Chain) {
        let mut c = Chain::genesis();
        let rs = (1..=n)
            .map(|i| {
                c.append(
                    i * 1000,
                    Event::new(EventKind::JobSubmitted, format!("operator op{}", i % 3))
                        .job(format!("0190aaaa-0000-7000-8000-{i:012}"))
                        .command(if i % 2 == 0 { "uptime" } else { "restart" })
                        .host(format!("web-{}", i % 4))
                        .detail(format!("detail number {i}")),
                )
            })
            .collect();
        (rs, c)
    }

    fn check(
        rs: &[Record],
        heads: &[SignedHead],
        key: Option<&PublicKey>,
    ) -> Result<Verified, Broken> {
        verify_chain(
            rs.iter().cloned().map(Ok::<_, String>),
            heads,
            key,
            &VerifyOptions::default(),
        )
    }

    #[test]
    fn an_intact_trail_verifies_with_its_heads() {
        let k = key();
        let (rs, c) = trail(10);
        let head = SignedHead::sign(&c, 99, &k);
        let v = check(&rs, &[head], Some(&k.public_key())).expect("intact");
        assert_eq!(
            (v.first, v.last, v.records, v.heads, v.signed_up_to),
            (1, 10, 10, 1, 10)
        );
    }

    #[test]
    fn tampering_names_the_first_bad_record() {
        let (rs, _) = trail(6);
        let cases: Vec<(&str, Vec<Record>, u64)> = vec![
            (
                "edit",
                {
                    let mut v = rs.clone();
                    v[2].event.actor = "someone else".into();
                    v
                },
                3,
            ),
            (
                "delete",
                {
                    let mut v = rs.clone();
                    v.remove(3);
                    v
                },
                4,
            ),
            (
                "reorder",
                {
                    let mut v = rs.clone();
                    v.swap(1, 2);
                    v
                },
                2,
            ),
            (
                "renumbered insert",
                {
                    let mut v = rs.clone();
                    let mut c = Chain::after(&v[1]);
                    let forged = c.append(2500, Event::new(EventKind::TokenCreated, "mallory"));
                    v.insert(2, forged);
                    for (i, r) in v.iter_mut().enumerate().skip(3) {
                        r.seq = i as u64 + 1;
                    }
                    v
                },
                4,
            ),
        ];
        for (name, v, bad) in cases {
            let err = check(&v, &[], None).expect_err(name);
            assert_eq!(err.seq(), bad, "{name}: {err}");
        }
    }

    #[test]
    fn a_rewritten_chain_is_caught_by_its_signed_head_and_truncation_too() {
        let k = key();
        let (rs, c) = trail(5);
        let head = SignedHead::sign(&c, 1, &k);
        // Rewrite everything from record 3 on, consistently.
        let mut v = rs[..2].to_vec();
        let mut c2 = Chain::after(&v[1]);
        for i in 3..=5 {
            v.push(c2.append(i * 1000, Event::new(EventKind::AgentJoined, "mallory")));
        }
        let err =
            check(&v, std::slice::from_ref(&head), Some(&k.public_key())).expect_err("rewritten");
        assert_eq!(err.seq(), 5);
        let err = check(&rs[..4], std::slice::from_ref(&head), Some(&k.public_key()))
            .expect_err("truncated");
        assert!(
            matches!(
                err,
                Broken::Truncated {
                    head_seq: 5,
                    last_seq: 4
                }
            ),
            "{err}"
        );
        let mut forged = head.clone();
        forged.hash = v[4].hash.clone();
        let err = check(&v, &[forged], Some(&k.public_key())).expect_err("forged head");
        assert!(matches!(err, Broken::Head { .. }), "{err}");
        let other = key();
        assert!(check(&rs, &[head], Some(&other.public_key())).is_err());
    }

    #[test]
    fn verification_can_start_in_the_middle() {
        let (rs, _) = trail(8);
        let opts = VerifyOptions {
            from: Some(4),
            anchor: None,
        };
        let v =
            verify_chain(rs.iter().cloned().map(Ok::<_, String>), &[], None, &opts).expect("ok");
        assert_eq!((v.first, v.last, v.records), (4, 8, 5));
    }

    #[test]
    fn records_round_trip_through_json_with_the_same_hash() {
        let (rs, _) = trail(3);
        for r in rs {
            let text = serde_json::to_string(&ExportLine::Record(r.clone())).expect("json");
            let back: ExportLine = serde_json::from_str(&text).expect("parse");
            assert_eq!(back, ExportLine::Record(r.clone()));
            let ExportLine::Record(b) = back else {
                unreachable!()
            };
            assert_eq!(b.expected_hash(), r.hash);
        }
    }

    #[test]
    fn filters() {
        let (rs, _) = trail(12);
        let seqs =
            |f: Filter| -> Vec<u64> { rs.iter().filter(|r| f.matches(r)).map(|r| r.seq).collect() };
        let f = |g: fn(&mut Filter)| {
            let mut x = Filter::default();
            g(&mut x);
            x
        };
        assert_eq!(
            seqs(f(|x| x.actor = Some("operator op1".into()))),
            vec![1, 4, 7, 10]
        );
        assert_eq!(seqs(f(|x| x.actor = Some("operator*".into()))).len(), 12);
        assert_eq!(
            seqs(f(|x| x.command = Some("uptime".into()))),
            vec![2, 4, 6, 8, 10, 12]
        );
        assert_eq!(seqs(f(|x| x.host = Some("web-0".into()))), vec![4, 8, 12]);
        let job = |typed: &str| {
            let r = crate::ids::JobRef::parse(typed).expect(typed);
            Filter {
                job_id: Some(r),
                ..Filter::default()
            }
        };
        assert_eq!(seqs(job("000000000011")), vec![11]);
        assert_eq!(seqs(job("0190aaaa-0000-7000-8000-000000000011")), vec![11]);
        assert_eq!(
            seqs(job("0190aaaa-0000-7000-8000-00000000001")),
            vec![10, 11, 12]
        );
        assert_eq!(seqs(f(|x| x.text = Some("NUMBER 11".into()))), vec![11]);
        assert_eq!(
            seqs(f(|x| {
                x.since_ms = Some(3000);
                x.until_ms = Some(5000);
            })),
            vec![3, 4]
        );
        assert!(seqs(f(|x| x.kinds = vec![EventKind::AuthFailed])).is_empty());
    }

    #[test]
    fn kinds_have_stable_names() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::parse(k.as_str()), Ok(*k));
            assert_eq!(
                serde_json::to_string(k).expect("json"),
                format!("\"{}\"", k.as_str())
            );
        }
        assert!(EventKind::parse("nope").is_err());
    }
}
