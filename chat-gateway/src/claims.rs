//! Several gateways on one chat act once. Every gateway of a Slack app, a
//! Mattermost team or one alert stream sees the same events; before one
//! acts on an event that others see too, it claims a key for it at the
//! controller (`Claims.Claim`), the one place all gateways share: the
//! first claim wins, the others stay silent and log it. The local
//! `store::ReplayGuard` stays the first, cheap check; it asks the
//! [`Arbiter`] only about what it recorded as new.
//!
//! When the claim cannot be made (the controller is unreachable), inbound
//! commands fail closed — the request is refused as busy and the platform
//! delivers it again later (a command must not run twice; nothing could be
//! submitted anyway) — while alerts fail open: posted, since an alert posted
//! twice is better than none.
//!
//! Keys are a kind and a SHA-256 of what identifies the thing, so whatever
//! a platform sends, the key is bounded and printable.

use std::time::Duration;

use crate::adapters::BoxFuture;
use crate::controller::{ControllerApi, ControllerError};

/// Longest claim the controller grants (`controller::claims::MAX_CLAIM_TTL`).
pub const MAX_TTL: Duration = Duration::from_secs(7 * 86_400);
/// How long an alert's claim holds: long past any redelivery of the same
/// announcement to another gateway's watch stream.
pub const ALERT_TTL: Duration = Duration::from_secs(86_400);

/// Who decides which gateway acts: the controller, or a fake in tests.
pub trait Arbiter: Send + Sync + 'static {
    /// Claims `key` for `ttl`; `Ok(true)`: this gateway acts.
    fn claim(&self, key: String, ttl: Duration) -> BoxFuture<'_, Result<bool, ControllerError>>;
}

impl<C: ControllerApi> Arbiter for C {
    fn claim(&self, key: String, ttl: Duration) -> BoxFuture<'_, Result<bool, ControllerError>> {
        let secs = u32::try_from(ttl.clamp(Duration::from_secs(1), MAX_TTL).as_secs())
            .expect("MAX_TTL fits in u32 seconds");
        Box::pin(ControllerApi::claim(self, key, secs))
    }
}

/// The claim key of `kind` for the thing named by `parts`: `kind/` and the
/// SHA-256 (hex) of the parts, each ended by a NUL (so `["a", "bc"]` and
/// `["ab", "c"]` differ).
pub fn key(kind: &str, parts: &[&str]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p.as_bytes());
        ctx.update(&[0]);
    }
    let digest = ctx.finish();
    let mut out = String::with_capacity(kind.len() + 1 + 64);
    out.push_str(kind);
    out.push('/');
    for b in digest.as_ref() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_bounded_printable_and_keep_parts_apart() {
        let k = key("replay", &["slack", "event:Ev1"]);
        assert!(
            k.starts_with("replay/") && k.len() == "replay/".len() + 64,
            "{k}"
        );
        assert_eq!(k, key("replay", &["slack", "event:Ev1"]));
        assert_ne!(key("r", &["a", "bc"]), key("r", &["ab", "c"]));
        let hostile = key("replay", &["webhook", &"\u{0}\n\u{202e}x".repeat(1000)]);
        assert!(hostile.len() <= 256 && !hostile.chars().any(char::is_control));
    }
}
