//! How an audit record is stored: a compact binary form (hashes as 32 bytes,
//! integers as varints, strings length-prefixed, no field names), about
//! half the size of its JSON. Records written as JSON by earlier versions
//! (they start with `{`) are still read, and a record the compact form cannot
//! represent exactly (a hash that is not 64 lowercase hex digits) is stored
//! as JSON, so decoding always gives back the record that was encoded.
//!
//! Storage only: the hash chain is over the canonical JSON of the record
//! (`fleetcmd_core::audit`), whatever form it is stored in.
//!
//! Layout (format 1): `0x01`, seq, time_ms (varints), prev_hash, hash
//! (32 bytes each), kind, actor, source, job_id, command (strings), the
//! number of hosts then each host, detail, the number of fields then each
//! key and value. A string is a varint length and that many UTF-8 bytes.

use std::collections::BTreeMap;

use fleetcmd_core::audit::{Event, EventKind, Record};
use fleetcmd_core::join_token::hex;

const FORMAT_1: u8 = 1;

/// Encodes a record for the `audit` tree.
pub fn encode(r: &Record) -> Vec<u8> {
    let (Some(prev), Some(hash)) = (unhex32(&r.prev_hash), unhex32(&r.hash)) else {
        return serde_json::to_vec(r).expect("audit records serialize to JSON");
    };
    let e = &r.event;
    let mut out = Vec::with_capacity(96 + e.actor.len() + e.job_id.len() + e.detail.len());
    out.push(FORMAT_1);
    varint(&mut out, r.seq);
    varint(&mut out, r.time_ms);
    out.extend_from_slice(&prev);
    out.extend_from_slice(&hash);
    for s in [e.kind.as_str(), &e.actor, &e.source, &e.job_id, &e.command] {
        string(&mut out, s);
    }
    varint(&mut out, e.hosts.len() as u64);
    for h in &e.hosts {
        string(&mut out, h);
    }
    string(&mut out, &e.detail);
    varint(&mut out, e.fields.len() as u64);
    for (k, v) in &e.fields {
        string(&mut out, k);
        string(&mut out, v);
    }
    out
}

/// Decodes what `encode` (or an earlier version's JSON) wrote. The error
/// says what was wrong, for `StoreError::Corrupt`.
pub fn decode(v: &[u8]) -> Result<Record, String> {
    match v.first() {
        Some(b'{') => serde_json::from_slice(v).map_err(|e| e.to_string()),
        Some(&FORMAT_1) => Reader { buf: &v[1..] }.record(),
        Some(b) => Err(format!("unknown record format {b:#04x}")),
        None => Err("empty record".into()),
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl Reader<'_> {
    fn record(mut self) -> Result<Record, String> {
        let seq = self.varint("seq")?;
        let time_ms = self.varint("time_ms")?;
        let prev_hash = hex(self.bytes(32, "prev_hash")?);
        let hash = hex(self.bytes(32, "hash")?);
        let kind = self.string("kind")?;
        let kind = EventKind::parse(&kind).map_err(|e| format!("kind: {e}"))?;
        let actor = self.string("actor")?;
        let source = self.string("source")?;
        let job_id = self.string("job_id")?;
        let command = self.string("command")?;
        let hosts = (0..self.count("hosts")?)
            .map(|_| self.string("host"))
            .collect::<Result<Vec<_>, _>>()?;
        let detail = self.string("detail")?;
        let mut fields = BTreeMap::new();
        for _ in 0..self.count("fields")? {
            let k = self.string("field name")?;
            let v = self.string("field value")?;
            fields.insert(k, v);
        }
        if !self.buf.is_empty() {
            return Err(format!("{} bytes after the record", self.buf.len()));
        }
        Ok(Record {
            seq,
            time_ms,
            event: Event {
                kind,
                actor,
                source,
                job_id,
                command,
                hosts,
                detail,
                fields,
            },
            prev_hash,
            hash,
        })
    }

    fn varint(&mut self, what: &str) -> Result<u64, String> {
        let mut v = 0u64;
        for (i, b) in self.buf.iter().enumerate().take(10) {
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                self.buf = &self.buf[i + 1..];
                return Ok(v);
            }
        }
        Err(format!("{what}: truncated or overlong number"))
    }

    fn bytes(&mut self, n: usize, what: &str) -> Result<&[u8], String> {
        if self.buf.len() < n {
            return Err(format!("{what}: truncated"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// A count of items that each take at least one byte, so a corrupt
    /// count cannot make us allocate more than the record holds.
    fn count(&mut self, what: &str) -> Result<usize, String> {
        let n = self.varint(what)?;
        if n > self.buf.len() as u64 {
            return Err(format!("{what}: {n} items in {} bytes", self.buf.len()));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let n = self.varint(what)?;
        let n = usize::try_from(n).map_err(|_| format!("{what}: length {n}"))?;
        let b = self.bytes(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what}: not UTF-8"))
    }
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn string(out: &mut Vec<u8>, s: &str) {
    varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// 64 lowercase hex digits as 32 bytes; anything else is `None` (then the
/// record is stored as JSON, which keeps it exactly).
fn unhex32(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(s[2 * i])? << 4 | digit(s[2 * i + 1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcmd_core::audit::Chain;

    fn finished(chain: &mut Chain) -> Record {
        chain.append(
            1_764_100_000_123,
            Event::new(EventKind::JobFinished, "agent:web-01234")
                .job("0193b1f2c3d4e5f60718293a4b5c6d7e")
                .host("web-01234")
                .field("outcome", "ok")
                .field("duration_ms", 12u64)
                .field("exit_code", 0)
                .detail("ünïcode ✓"),
        )
    }

    #[test]
    fn records_round_trip_at_about_half_their_json_size() {
        let mut chain = Chain::genesis();
        let a = chain.append(1, Event::new(EventKind::TokenCreated, "operator admin"));
        let b = finished(&mut chain);
        for r in [a, b.clone()] {
            let bytes = encode(&r);
            assert_eq!(bytes[0], FORMAT_1);
            assert_eq!(decode(&bytes).expect("decodes"), r);
            assert_eq!(decode(&bytes).expect("decodes").expected_hash(), r.hash);
        }
        let json = serde_json::to_vec(&b).expect("json");
        let compact = encode(&b);
        assert!(
            compact.len() * 2 <= json.len() + 40,
            "{} bytes compact vs {} JSON",
            compact.len(),
            json.len()
        );
    }

    #[test]
    fn earlier_json_records_and_unrepresentable_hashes_stay_json() {
        let mut chain = Chain::genesis();
        let r = finished(&mut chain);
        let json = serde_json::to_vec(&r).expect("json");
        assert_eq!(decode(&json).expect("legacy JSON decodes"), r);

        let mut odd = r.clone();
        odd.hash = odd.hash.to_uppercase();
        let bytes = encode(&odd);
        assert_eq!(bytes[0], b'{', "kept as JSON");
        assert_eq!(decode(&bytes).expect("decodes"), odd);
    }

    #[test]
    fn damaged_records_are_refused_with_what_is_wrong() {
        let mut chain = Chain::genesis();
        let bytes = encode(&finished(&mut chain));
        // Every truncation is an error, never a panic or a shorter record.
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "truncated to {n} bytes");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert_eq!(
            decode(&extra).expect_err("trailing byte"),
            "1 bytes after the record"
        );
        assert_eq!(
            decode(&[7, 1, 2]).expect_err("format"),
            "unknown record format 0x07"
        );
        // A huge host count is refused before anything is allocated.
        let mut huge = vec![FORMAT_1, 1, 1];
        huge.extend_from_slice(&[0; 64]);
        for s in ["job_finished", "a", "", "", ""] {
            string(&mut huge, s);
        }
        varint(&mut huge, u64::MAX);
        assert!(
            decode(&huge).expect_err("count").starts_with("hosts: "),
            "names the field"
        );
        // Invalid UTF-8 in a string.
        let mut bad = vec![FORMAT_1, 1, 1];
        bad.extend_from_slice(&[0; 64]);
        bad.extend_from_slice(&[2, 0xff, 0xfe]);
        assert_eq!(decode(&bad).expect_err("utf8"), "kind: not UTF-8");
    }
}
