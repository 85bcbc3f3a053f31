//! The byte layout the embedded backends (sled, redb) share: keys ordered
//! for range scans — jobs by id (UUIDv7, so by time), targets by
//! `job/agent`, audit records and heads by big-endian seq, audit index
//! entries by `dim value 0x00 time seq`, health states and histories by
//! name — and the values that are not records (presence entries, live
//! rows, claim expiries, exporter cursors). One layout, so a key or value
//! means the same in either file.

use std::time::{SystemTime, UNIX_EPOCH};

use fleetcmd_core::audit::Record;

use super::{
    AgentLive, AuditDim, AuditIndexEntry, ExportCursor, Presence, StoreError, TokenRecord,
    TokenRefusal,
};

/// The wall clock in Unix milliseconds: the embedded stores' clock for
/// leases, claims and presence (one process holds the file).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub(crate) fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The short id of a stored job id; `None` for a key that is not a job id.
pub(crate) fn short_of(id: &[u8]) -> Option<String> {
    let id = std::str::from_utf8(id).ok()?;
    fleetcmd_core::ids::JobId::parse(id)
        .ok()
        .map(|j| j.short().to_string())
}

/// The embedded stores' rule for using a join token: `rec` as stored,
/// and what to store back (one use fewer), or why it is refused. Hashes
/// are compared, not secrets: timing reveals nothing an attacker can
/// steer, since they cannot choose SHA-256 outputs.
pub(crate) fn use_token(
    rec: &TokenRecord,
    secret_hash: &str,
    now: u64,
) -> Result<TokenRecord, TokenRefusal> {
    if rec.secret_hash != secret_hash {
        return Err(TokenRefusal::Unknown);
    }
    if now > rec.expires_at {
        return Err(TokenRefusal::Expired);
    }
    if rec.uses_left == 0 {
        return Err(TokenRefusal::Used);
    }
    let mut next = rec.clone();
    next.uses_left -= 1;
    Ok(next)
}

pub(crate) fn target_key(job: &str, agent: &str) -> Vec<u8> {
    format!("{job}/{agent}").into_bytes()
}

/// The prefix of every target key of `job`.
pub(crate) fn targets_prefix(job: &str) -> String {
    format!("{job}/")
}

pub(crate) fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// The seq of an audit record or head key, or the last 8 bytes of an
/// index key.
pub(crate) fn seq_of(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = k.len().min(8);
    b[8 - n..].copy_from_slice(&k[k.len() - n..]);
    u64::from_be_bytes(b)
}

/// The time of an index key (the 8 bytes before its seq).
pub(crate) fn time_of(k: &[u8]) -> u64 {
    if k.len() < 16 {
        return 0;
    }
    seq_of(&k[..k.len() - 8])
}

fn dim_byte(dim: AuditDim) -> u8 {
    match dim {
        AuditDim::Actor => b'a',
        AuditDim::Host => b'h',
        AuditDim::Command => b'c',
        AuditDim::Job => b'j',
        AuditDim::Kind => b'k',
    }
}

fn index_prefix(dim: AuditDim, value: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(value.len() + 2);
    k.push(dim_byte(dim));
    k.extend(value.bytes().filter(|b| *b != 0));
    k.push(0);
    k
}

pub(crate) fn index_key(e: &AuditIndexEntry) -> Vec<u8> {
    let mut k = index_prefix(e.dim, &e.value);
    k.extend_from_slice(&e.time_ms.to_be_bytes());
    k.extend_from_slice(&e.seq.to_be_bytes());
    k
}

/// The index key range of `audit_index_page`: `dim` = `value` from
/// `since_ms` up to (not including) `before`; `None` when empty.
pub(crate) fn index_range(
    dim: AuditDim,
    value: &str,
    since_ms: u64,
    before: (u64, u64),
) -> Option<(Vec<u8>, Vec<u8>)> {
    let prefix = index_prefix(dim, value);
    let mut lo = prefix.clone();
    lo.extend_from_slice(&since_ms.to_be_bytes());
    let mut hi = prefix;
    hi.extend_from_slice(&before.0.to_be_bytes());
    hi.extend_from_slice(&before.1.to_be_bytes());
    (lo < hi).then_some((lo, hi))
}

pub(crate) fn decode_record(k: &[u8], v: &[u8]) -> Result<Record, StoreError> {
    crate::audit::codec::decode(v).map_err(|reason| StoreError::Corrupt {
        key: format!("audit/{}", seq_of(k)),
        reason,
    })
}

pub(crate) fn decode_head(
    k: &[u8],
    v: &[u8],
) -> Result<fleetcmd_core::audit::SignedHead, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        key: format!("audit_heads/{}", seq_of(k)),
        reason: e.to_string(),
    })
}

pub(crate) fn encode_head(head: &fleetcmd_core::audit::SignedHead) -> Vec<u8> {
    serde_json::to_vec(head).expect("signed heads serialize to JSON")
}

pub(crate) fn state_key(name: &str) -> Vec<u8> {
    format!("state/{name}").into_bytes()
}

pub(crate) fn history_prefix(name: &str) -> Vec<u8> {
    format!("hist/{name}/").into_bytes()
}

pub(crate) fn history_key(name: &str, at_ms: u64) -> Vec<u8> {
    let mut key = history_prefix(name);
    key.extend_from_slice(format!("{at_ms:020}").as_bytes());
    key
}

/// The key after every key starting with `prefix` (`None`: no such key,
/// the prefix is all 0xff), for range scans of a prefix.
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// A claim's value: its expiry in Unix milliseconds (8 bytes, big-endian).
pub(crate) fn claim_value(until_ms: u64) -> [u8; 8] {
    until_ms.to_be_bytes()
}

/// The expiry stored in a claim's value; another length counts as expired.
pub(crate) fn claim_expiry(v: &[u8]) -> u64 {
    v.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

/// Presence entries not written for this long are removed.
pub(crate) const FORGET_PRESENCE_MS: u64 = 24 * 3600 * 1000;

/// A presence value: written-at in Unix milliseconds (8 bytes,
/// big-endian), a settling byte, then the agents' names separated by
/// newlines (a name never holds one).
pub(crate) fn presence_value(now: u64, settling: bool, agents: &[u8]) -> Vec<u8> {
    let mut v = now.to_be_bytes().to_vec();
    v.push(u8::from(settling));
    v.extend_from_slice(agents);
    v
}

/// The agents' part of a presence value (`None`: too short to be one).
pub(crate) fn presence_agents(v: &[u8]) -> Option<&[u8]> {
    v.get(9..)
}

/// A presence entry written at or after `since`; `None` when older (or too
/// short to be an entry).
pub(crate) fn decode_presence(
    k: &[u8],
    v: &[u8],
    since: u64,
) -> Result<Option<Presence>, StoreError> {
    if v.len() < 9 || written_at(v) < since {
        return Ok(None);
    }
    let key = String::from_utf8_lossy(k).into_owned();
    let names = std::str::from_utf8(&v[9..]).map_err(|e| StoreError::Corrupt {
        key: format!("presence/{key}"),
        reason: e.to_string(),
    })?;
    Ok(Some(Presence {
        controller: key,
        settling: v[8] != 0,
        agents: names
            .split('\n')
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect(),
    }))
}

/// A live row's value: written-at (8 bytes), the controller's name's
/// length (2 bytes, big-endian), the name, the data.
pub(crate) fn live_value(now: u64, r: &AgentLive) -> Result<Vec<u8>, StoreError> {
    let name = r.controller.as_bytes();
    let len = u16::try_from(name.len())
        .map_err(|_| StoreError::Backend(format!("controller name of {} bytes", name.len())))?;
    let mut v = Vec::with_capacity(10 + name.len() + r.data.len());
    v.extend_from_slice(&now.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(name);
    v.extend_from_slice(&r.data);
    Ok(v)
}

/// A live row written at or after `from`; `None` when older.
pub(crate) fn decode_live(k: &[u8], v: &[u8], from: u64) -> Result<Option<AgentLive>, StoreError> {
    if written_at(v) < from {
        return Ok(None);
    }
    let agent = String::from_utf8_lossy(k).into_owned();
    let corrupt = |reason: &str| StoreError::Corrupt {
        key: format!("agent_live/{agent}"),
        reason: reason.to_owned(),
    };
    let len = v
        .get(8..10)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        .ok_or_else(|| corrupt("shorter than its header"))?;
    let name = v
        .get(10..10 + len)
        .ok_or_else(|| corrupt("shorter than its controller name"))?;
    Ok(Some(AgentLive {
        controller: std::str::from_utf8(name)
            .map_err(|e| corrupt(&e.to_string()))?
            .to_owned(),
        data: v[10 + len..].to_vec(),
        agent,
    }))
}

/// The write time stored at the start of a presence value or live row (0
/// when too short).
pub(crate) fn written_at(v: &[u8]) -> u64 {
    v.get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// An exporter cursor's value: records, then heads (8 bytes each).
pub(crate) fn cursor_value(cursor: ExportCursor) -> Vec<u8> {
    let mut v = cursor.records.to_be_bytes().to_vec();
    v.extend_from_slice(&cursor.heads.to_be_bytes());
    v
}

pub(crate) fn decode_cursor(name: &str, v: &[u8]) -> Result<ExportCursor, StoreError> {
    let n = |at: usize| {
        v.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| StoreError::Corrupt {
                key: format!("export_cursors/{name}"),
                reason: format!("{} bytes, expected 16", v.len()),
            })
    };
    Ok(ExportCursor {
        records: n(0)?,
        heads: n(8)?,
    })
}
