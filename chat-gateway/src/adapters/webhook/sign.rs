//! The fleetcmd webhook signature, used in both directions:
//!
//! ```text
//! X-Fleetcmd-Timestamp: <unix seconds>
//! X-Fleetcmd-Signature: v1=<hex HMAC-SHA256(secret, "v1:" + timestamp + ":" + raw body)>
//! ```
//!
//! A request is accepted when its timestamp is within [`MAX_SKEW_SECS`] of
//! now and the signature matches (compared in constant time by
//! `ring::hmac::verify`). The timestamp is inside the MAC, so an old request
//! cannot be replayed with a fresh timestamp. Pure: the caller passes `now`.

use ring::hmac;

pub const TIMESTAMP_HEADER: &str = "x-fleetcmd-timestamp";
pub const SIGNATURE_HEADER: &str = "x-fleetcmd-signature";
/// How far a timestamp may be from now, either way (5 minutes).
pub const MAX_SKEW_SECS: u64 = 300;
/// The version prefix of the signature header value.
pub const VERSION: &str = "v1";

/// Why a signed request was refused. Says nothing about the expected value.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum VerifyError {
    #[error("missing X-Fleetcmd-Timestamp header")]
    MissingTimestamp,
    #[error("missing X-Fleetcmd-Signature header")]
    MissingSignature,
    #[error("X-Fleetcmd-Timestamp is not unix seconds")]
    BadTimestamp,
    #[error("timestamp outside the 5-minute window")]
    Stale,
    #[error("X-Fleetcmd-Signature is not v1=<64 hex digits>")]
    Malformed,
    #[error("signature does not match")]
    Mismatch,
}

fn key(secret: &[u8]) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, secret)
}

fn signed_bytes(timestamp: &str, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(body.len() + timestamp.len() + 4);
    m.extend_from_slice(VERSION.as_bytes());
    m.push(b':');
    m.extend_from_slice(timestamp.as_bytes());
    m.push(b':');
    m.extend_from_slice(body);
    m
}

fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 0xf)] as char);
    }
    s
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// The `X-Fleetcmd-Signature` value for `body` sent at `timestamp`.
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let tag = hmac::sign(&key(secret), &signed_bytes(&timestamp.to_string(), body));
    format!("{VERSION}={}", to_hex(tag.as_ref()))
}

/// Checks the two header values against `body` at time `now`.
pub fn verify(
    secret: &[u8],
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: u64,
) -> Result<(), VerifyError> {
    let ts_text = timestamp.ok_or(VerifyError::MissingTimestamp)?.trim();
    let sig = signature.ok_or(VerifyError::MissingSignature)?.trim();
    if ts_text.is_empty() || ts_text.len() > 12 || !ts_text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(VerifyError::BadTimestamp);
    }
    let ts: u64 = ts_text.parse().map_err(|_| VerifyError::BadTimestamp)?;
    if ts.abs_diff(now) > MAX_SKEW_SECS {
        return Err(VerifyError::Stale);
    }
    let tag = sig
        .strip_prefix(VERSION)
        .and_then(|s| s.strip_prefix('='))
        .filter(|h| h.len() == 64)
        .and_then(from_hex)
        .ok_or(VerifyError::Malformed)?;
    hmac::verify(&key(secret), &signed_bytes(ts_text, body), &tag)
        .map_err(|_| VerifyError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn known_vector() {
        // printf %s 'v1:1700000000:{"user":"alice","text":"!whoami"}' |
        //   openssl dgst -sha256 -hmac 0123456789abcdef0123456789abcdef
        let body = br#"{"user":"alice","text":"!whoami"}"#;
        assert_eq!(
            sign(SECRET, 1_700_000_000, body),
            "v1=0e441db988101d85f7cbf36503a308a9d10af35823cab31afb322cfd2f5dd2dd"
        );
    }

    #[test]
    fn verify_table() {
        let body = b"{}";
        let now = 1_700_000_000;
        let good = sign(SECRET, now, body);
        let ts = now.to_string();
        let check =
            |t: Option<&str>, s: Option<&str>, b: &[u8], now: u64| verify(SECRET, t, s, b, now);
        assert_eq!(check(Some(&ts), Some(&good), body, now), Ok(()));
        assert_eq!(check(Some(&ts), Some(&good), body, now + 300), Ok(()));
        assert_eq!(check(Some(&ts), Some(&good), body, now - 300), Ok(()));
        assert_eq!(
            check(Some(&ts), Some(&good), body, now + 301),
            Err(VerifyError::Stale)
        );
        assert_eq!(
            check(None, Some(&good), body, now),
            Err(VerifyError::MissingTimestamp)
        );
        assert_eq!(
            check(Some(&ts), None, body, now),
            Err(VerifyError::MissingSignature)
        );
        assert_eq!(
            check(Some("-1"), Some(&good), body, now),
            Err(VerifyError::BadTimestamp)
        );
        assert_eq!(
            check(Some(&ts), Some("v2=00"), body, now),
            Err(VerifyError::Malformed)
        );
        assert_eq!(
            check(Some(&ts), Some(&good), b"{ }", now),
            Err(VerifyError::Mismatch)
        );
        let other_ts = (now + 1).to_string();
        assert_eq!(
            check(Some(&other_ts), Some(&good), body, now),
            Err(VerifyError::Mismatch),
            "the timestamp is signed"
        );
        let upper = good.to_uppercase().replacen("V1", "v1", 1);
        assert_eq!(check(Some(&ts), Some(&upper), body, now), Ok(()));
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(to_hex(&[0, 0xab, 0xff]), "00abff");
        assert_eq!(from_hex("00abFF"), Some(vec![0, 0xab, 0xff]));
        assert_eq!(from_hex("0g"), None);
        assert_eq!(from_hex("abc"), None);
    }
}
