//! Interactive message buttons whose context carries an HMAC.
//!
//! Mattermost keeps a button's `integration.context` on the server (clients
//! only see an opaque cookie) and posts it back unchanged, with the clicking
//! user's id, when the button is clicked. Anyone who can reach the callback
//! URL could post a click too, so the context is signed: the command, its
//! job, the channel and the time the button was made are covered by an
//! HMAC-SHA256 under `action_secret`, and a click is accepted only with a
//! valid MAC and within `button_max_age`.

use std::time::Duration;

use ring::hmac;
use serde_json::{Value, json};

/// Domain separation for the MAC input, so the key signs nothing else.
const MAC_LABEL: &str = "fleetcmd/mattermost-button/v1";
/// Clock skew allowed between the gateway that made the button and the one
/// that verifies the click (several gateways may share a secret).
const FUTURE_SKEW_SECS: u64 = 60;

/// Why a click was refused.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ClickRefused {
    #[error("button context has no valid `{0}`")]
    Missing(&'static str),
    #[error("button context MAC does not verify")]
    BadMac,
    #[error("button expired {0} s ago")]
    Expired(u64),
    #[error("button issued in the future")]
    FromFuture,
    #[error("button belongs to another channel")]
    WrongChannel,
}

/// A click whose context verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedClick {
    pub command: String,
    pub channel_id: String,
}

/// Signs button contexts and verifies clicks.
pub struct ButtonSigner {
    key: hmac::Key,
    callback_url: String,
    max_age: Duration,
}

impl std::fmt::Debug for ButtonSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ButtonSigner")
            .field("callback_url", &self.callback_url)
            .field("max_age", &self.max_age)
            .finish_non_exhaustive()
    }
}

/// The job a command is about (`approve 01ab…` → `01ab…`), or empty.
pub fn job_of(command: &str) -> &str {
    let mut words = command.split_whitespace();
    match (words.next(), words.next()) {
        (Some("approve" | "deny" | "cancel" | "job" | "output"), Some(id)) => id,
        _ => "",
    }
}

fn canonical(channel_id: &str, command: &str, job: &str, issued_at: &str) -> String {
    // Length-prefixed fields: no separator inside a value can shift a field.
    let mut s = format!("{MAC_LABEL}\n");
    for field in [channel_id, command, job, issued_at] {
        s.push_str(&format!("{}:{field}\n", field.len()));
    }
    s
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

impl ButtonSigner {
    pub fn new(secret: &[u8], callback_url: &str, max_age: Duration) -> ButtonSigner {
        ButtonSigner {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            callback_url: callback_url.to_string(),
            max_age,
        }
    }

    pub fn callback_url(&self) -> &str {
        &self.callback_url
    }

    /// Hex HMAC-SHA256 over the canonical context fields.
    pub fn mac(&self, channel_id: &str, command: &str, job: &str, issued_at: &str) -> String {
        hex(hmac::sign(
            &self.key,
            canonical(channel_id, command, job, issued_at).as_bytes(),
        )
        .as_ref())
    }

    /// The `integration.context` of a button for `command` in `channel_id`,
    /// made at unix time `now`.
    pub fn context(&self, channel_id: &str, command: &str, now: u64) -> Value {
        let job = job_of(command);
        let issued_at = now.to_string();
        json!({
            "command": command,
            "job": job,
            "channel_id": channel_id,
            "issued_at": issued_at,
            "mac": self.mac(channel_id, command, job, &issued_at),
        })
    }

    /// Checks a click's context (MAC in constant time, then age) at unix
    /// time `now`. `clicked_in` is the channel Mattermost says the post is
    /// in; when given it must be the one the button was made for.
    pub fn verify(
        &self,
        context: &Value,
        clicked_in: Option<&str>,
        now: u64,
    ) -> Result<VerifiedClick, ClickRefused> {
        let field = |name: &'static str| {
            context
                .get(name)
                .and_then(Value::as_str)
                .ok_or(ClickRefused::Missing(name))
        };
        let command = field("command")?;
        let job = field("job")?;
        let channel_id = field("channel_id")?;
        let issued_at = field("issued_at")?;
        let mac = unhex(field("mac")?).ok_or(ClickRefused::BadMac)?;
        hmac::verify(
            &self.key,
            canonical(channel_id, command, job, issued_at).as_bytes(),
            &mac,
        )
        .map_err(|_| ClickRefused::BadMac)?;
        // Only now is the content trusted enough to interpret.
        let issued: u64 = issued_at
            .parse()
            .map_err(|_| ClickRefused::Missing("issued_at"))?;
        if issued > now + FUTURE_SKEW_SECS {
            return Err(ClickRefused::FromFuture);
        }
        let age = now.saturating_sub(issued);
        if age > self.max_age.as_secs() {
            return Err(ClickRefused::Expired(age - self.max_age.as_secs()));
        }
        if clicked_in.is_some_and(|c| !c.is_empty() && c != channel_id) {
            return Err(ClickRefused::WrongChannel);
        }
        Ok(VerifiedClick {
            command: command.to_string(),
            channel_id: channel_id.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> ButtonSigner {
        ButtonSigner::new(
            b"0123456789abcdef0123",
            "http://gw/mattermost/actions",
            Duration::from_secs(900),
        )
    }

    #[test]
    fn a_context_verifies_until_it_expires() {
        let s = signer();
        let ctx = s.context("chan1", "approve 0190abcd", 1_000_000);
        assert_eq!(ctx["job"], "0190abcd");
        let ok = VerifiedClick {
            command: "approve 0190abcd".into(),
            channel_id: "chan1".into(),
        };
        assert_eq!(s.verify(&ctx, Some("chan1"), 1_000_000), Ok(ok.clone()));
        assert_eq!(s.verify(&ctx, None, 1_000_900), Ok(ok));
        assert_eq!(
            s.verify(&ctx, None, 1_000_901),
            Err(ClickRefused::Expired(1))
        );
        assert_eq!(
            s.verify(&ctx, None, 1_000_000 - 61),
            Err(ClickRefused::FromFuture)
        );
        assert_eq!(
            s.verify(&ctx, Some("chan2"), 1_000_000),
            Err(ClickRefused::WrongChannel)
        );
    }

    #[test]
    fn any_changed_field_breaks_the_mac() {
        let s = signer();
        let ctx = s.context("chan1", "approve 0190abcd", 1_000_000);
        for (field, value) in [
            ("command", "run reboot on all"),
            ("job", "ffff"),
            ("channel_id", "chan2"),
            ("issued_at", "1000500"),
            ("mac", "00"),
            ("mac", "zz"),
        ] {
            let mut forged = ctx.clone();
            forged[field] = json!(value);
            assert_eq!(
                s.verify(&forged, None, 1_000_000),
                Err(ClickRefused::BadMac),
                "{field}"
            );
        }
        let other = ButtonSigner::new(b"another key of 16+ bytes", "x", Duration::from_secs(900));
        assert_eq!(
            other.verify(&ctx, None, 1_000_000),
            Err(ClickRefused::BadMac)
        );
        let mut missing = ctx.clone();
        missing.as_object_mut().map(|o| o.remove("issued_at"));
        assert_eq!(
            s.verify(&missing, None, 1_000_000),
            Err(ClickRefused::Missing("issued_at"))
        );
        assert_eq!(
            s.verify(&json!("not an object"), None, 1),
            Err(ClickRefused::Missing("command"))
        );
    }

    #[test]
    fn fields_cannot_be_shifted_across_the_separator() {
        assert_ne!(
            canonical("a\n1:b", "c", "", "1"),
            canonical("a", "b\n1:c", "", "1")
        );
        assert_ne!(canonical("ab", "c", "", "1"), canonical("a", "bc", "", "1"));
    }
}
