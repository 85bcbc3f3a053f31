//! Identifiers built only through their parsers: agent names, job ids
//! (UUIDv7) and the stable chat/CLI identities of ARCHITECTURE.md invariant 8.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why an identifier was refused.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum IdError {
    #[error(
        "invalid agent id \"{0}\": use 1-63 lowercase letters, digits, `.` or `-`, starting with a letter or digit"
    )]
    AgentId(String),
    #[error("invalid job id \"{input}\": {reason}")]
    JobId { input: String, reason: String },
    #[error("invalid identity \"{input}\": {reason}")]
    Identity { input: String, reason: String },
}

fn shown(s: &str) -> String {
    s.chars().take(100).collect()
}

/// An agent's name: `[a-z0-9][a-z0-9.-]{0,62}`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AgentId(String);

impl AgentId {
    /// Parses a lowercase host-name-like id.
    pub fn parse(s: &str) -> Result<AgentId, IdError> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 63
            && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'.' || *c == b'-');
        if ok {
            Ok(AgentId(s.to_string()))
        } else {
            Err(IdError::AgentId(shown(s)))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A job id: a version 7 UUID in canonical lowercase hyphenated form. It is
/// also the job's nonce for replay protection.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(String);

impl JobId {
    /// Parses `xxxxxxxx-xxxx-7xxx-xxxx-xxxxxxxxxxxx` (lowercase hex).
    pub fn parse(s: &str) -> Result<JobId, IdError> {
        let err = |reason: &str| IdError::JobId {
            input: shown(s),
            reason: reason.to_string(),
        };
        let b = s.as_bytes();
        if b.len() != 36 {
            return Err(err("expected a 36-character UUID"));
        }
        for (i, c) in b.iter().enumerate() {
            let dash = matches!(i, 8 | 13 | 18 | 23);
            if dash && *c != b'-' {
                return Err(err("expected hyphens at positions 9, 14, 19 and 24"));
            }
            if !(dash || c.is_ascii_digit() || (b'a'..=b'f').contains(c)) {
                return Err(err("expected lowercase hexadecimal digits"));
            }
        }
        if b[14] != b'7' {
            return Err(err("expected a version 7 UUID"));
        }
        Ok(JobId(s.to_string()))
    }

    /// Builds the canonical form of a version 7 UUID given as 16 bytes.
    pub fn from_uuid_v7_bytes(b: [u8; 16]) -> Result<JobId, IdError> {
        let h = crate::crypto::hex(&b);
        let s = format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        );
        JobId::parse(&s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The creation time in unix milliseconds (the first 48 bits of a v7 UUID).
    pub fn unix_ms(&self) -> u64 {
        let hex: String = self.0.chars().filter(|c| *c != '-').take(12).collect();
        // The parser guarantees 12 hex digits here.
        u64::from_str_radix(&hex, 16).unwrap_or(0)
    }
}

/// The schemes of [`Identity`], each followed by `:`.
pub const IDENTITY_SCHEMES: [&str; 8] = [
    "slack",
    "mattermost",
    "campfire",
    "irc",
    "xmpp",
    "console",
    "cli",
    "webhook",
];

/// A requester's stable identity (never a display name), e.g.
/// `slack:T0001:U024BE7LH` or `irc:libera:alice!alice@ops.example.com`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Identity(String);

/// Maximum length of an identity in bytes.
pub const MAX_IDENTITY_BYTES: usize = 256;

impl Identity {
    /// Parses one of the forms of ARCHITECTURE.md invariant 8: `slack:<team>:<user>`,
    /// `mattermost:<server>:<user_id>`, `campfire:<server>:<user_id>`, `irc:<network>:<nick>!<user>@<host>`
    /// (or `irc:<network>:<account>` where the server names the account),
    /// `xmpp:<bare-jid>`, `console:<os-user>`, `cli:<cert-subject>`,
    /// `webhook:<name>`.
    pub fn parse(s: &str) -> Result<Identity, IdError> {
        let err = |reason: &str| IdError::Identity {
            input: shown(s),
            reason: reason.to_string(),
        };
        if s.len() > MAX_IDENTITY_BYTES {
            return Err(err("longer than 256 bytes"));
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err("contains whitespace or control characters"));
        }
        let (scheme, rest) = s
            .split_once(':')
            .ok_or_else(|| err("expected `<scheme>:...`"))?;
        let two_parts = |rest: &str, last: bool| {
            let split = if last {
                rest.rsplit_once(':')
            } else {
                rest.split_once(':')
            };
            matches!(split, Some((a, b)) if !a.is_empty() && !b.is_empty())
        };
        let ok = match scheme {
            "slack" => two_parts(rest, false) && rest.matches(':').count() == 1,
            "mattermost" | "campfire" => two_parts(rest, true),
            "irc" => match rest.split_once(':') {
                Some((network, who)) if !network.is_empty() && !who.is_empty() => {
                    match who.split_once('!') {
                        None => true,
                        Some((nick, userhost)) => {
                            matches!(userhost.split_once('@'), Some((u, h)) if !nick.is_empty() && !u.is_empty() && !h.is_empty())
                        }
                    }
                }
                _ => false,
            },
            "xmpp" => !rest.is_empty() && !rest.contains('/'),
            "console" | "cli" | "webhook" => !rest.is_empty(),
            _ => {
                return Err(err(
                    "unknown scheme; expected one of slack, mattermost, campfire, irc, xmpp, console, cli, webhook",
                ));
            }
        };
        if ok {
            Ok(Identity(s.to_string()))
        } else {
            Err(err(match scheme {
                "slack" => "expected slack:<team>:<user>",
                "mattermost" => "expected mattermost:<server>:<user_id>",
                "campfire" => "expected campfire:<server>:<user_id>",
                "irc" => "expected irc:<network>:<nick>!<user>@<host>",
                "xmpp" => "expected xmpp:<bare-jid>",
                _ => "the part after the scheme must not be empty",
            }))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The scheme, e.g. `slack`.
    pub fn scheme(&self) -> &str {
        self.0.split_once(':').map_or("", |(s, _)| s)
    }

    /// Whole-string glob match where `*` matches any run of characters
    /// (including none) and everything else is literal.
    ///
    /// ```
    /// use fleetcmd_core::ids::Identity;
    /// let who = Identity::parse("irc:libera:alice!al@ops.example.com").unwrap();
    /// assert!(who.matches_pattern("irc:libera:alice!*@ops.example.com"));
    /// assert!(!who.matches_pattern("irc:libera:alice!*@example.com"));
    /// ```
    pub fn matches_pattern(&self, pattern: &str) -> bool {
        crate::glob::glob_match(pattern, &self.0, false)
    }
}

macro_rules! string_newtype {
    ($t:ident) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl std::str::FromStr for $t {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $t::parse(s)
            }
        }
        impl TryFrom<String> for $t {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                $t::parse(&s)
            }
        }
        impl From<$t> for String {
            fn from(v: $t) -> String {
                v.0
            }
        }
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}
string_newtype!(AgentId);
string_newtype!(JobId);
string_newtype!(Identity);

#[cfg(test)]
mod tests {
    use super::*;

    fn check_agent(input: &str, ok: bool) {
        assert_eq!(
            AgentId::parse(input).is_ok(),
            ok,
            "AgentId::parse({input:?})"
        );
    }

    #[test]
    fn agent_ids() {
        for (i, ok) in [
            ("web-1", true),
            ("web-1.example.com", true),
            ("0", true),
            ("Web-1", false),
            ("-web", false),
            (".web", false),
            ("", false),
            ("web_1", false),
            ("web 1", false),
            (&"a".repeat(63), true),
            (&"a".repeat(64), false),
        ] {
            check_agent(i, ok);
        }
    }

    fn check_job(input: &str, ok: bool) {
        assert_eq!(JobId::parse(input).is_ok(), ok, "JobId::parse({input:?})");
    }

    #[test]
    fn job_ids() {
        for (i, ok) in [
            ("01890a5d-ac96-774b-bcce-b302099a8057", true),
            ("01890A5D-AC96-774B-BCCE-B302099A8057", false),
            ("01890a5d-ac96-474b-bcce-b302099a8057", false),
            ("01890a5dac96774bbcceb302099a8057", false),
            ("01890a5d-ac96-774b-bcce-b302099a805", false),
            ("01890a5d-ac96-774b-bcce_b302099a8057", false),
            ("01890a5d-ac96-774b-bcce-b302099a805g", false),
            ("", false),
        ] {
            check_job(i, ok);
        }
    }

    #[test]
    fn job_id_from_bytes_and_time() {
        let mut b = [0u8; 16];
        b[..6].copy_from_slice(&0x0189_0a5d_ac96u64.to_be_bytes()[2..]);
        b[6] = 0x77;
        b[8] = 0xbc;
        let id = JobId::from_uuid_v7_bytes(b).ok();
        assert_eq!(
            id.as_ref().map(|i| i.as_str()),
            Some("01890a5d-ac96-7700-bc00-000000000000")
        );
        assert_eq!(id.map(|i| i.unix_ms()), Some(0x0189_0a5d_ac96));
        b[6] = 0x47;
        assert!(JobId::from_uuid_v7_bytes(b).is_err());
    }

    fn check_identity(input: &str, ok: bool) {
        assert_eq!(
            Identity::parse(input).is_ok(),
            ok,
            "Identity::parse({input:?})"
        );
    }

    #[test]
    fn identities() {
        for (i, ok) in [
            ("slack:T0001:U024BE7LH", true),
            ("slack:T0001:", false),
            ("slack::U1", false),
            ("slack:T0001", false),
            ("slack:T1:U1:x", false),
            ("mattermost:chat.example.com:8065:abc123", true),
            ("mattermost:chat.example.com", false),
            ("irc:libera:alice!al@ops.example.com", true),
            ("irc:libera:alice", true),
            ("irc:libera:alice!@host", false),
            ("irc:libera:!u@h", false),
            ("irc::alice!a@h", false),
            ("xmpp:alice@example.com", true),
            ("xmpp:alice@example.com/phone", false),
            ("console:alice", true),
            ("console:", false),
            ("cli:CN=alice,O=ops", true),
            ("webhook:alertmanager", true),
            ("matrix:@a:b", false),
            ("slack:T0001:U 1", false),
            ("slack:T0001:U\u{7}1", false),
            ("nocolon", false),
            (&format!("console:{}", "a".repeat(300)), false),
        ] {
            check_identity(i, ok);
        }
    }

    #[test]
    fn identity_patterns_and_serde() {
        let who = Identity::parse("slack:T0001:U0LEADX").ok();
        let who = who.as_ref();
        assert_eq!(who.map(|w| w.scheme()), Some("slack"));
        for (p, e) in [
            ("slack:T0001:*", true),
            ("slack:T0001:U0LEAD*", true),
            ("slack:T0001:U0LEAD", false),
            ("slack:T0001:U0LEAD?", false),
            ("slack:*", true),
            ("*", true),
            ("slack:T0002:*", false),
        ] {
            assert_eq!(who.map(|w| w.matches_pattern(p)), Some(e), "{p}");
        }
        let json = serde_json::to_string(&who).ok();
        assert_eq!(json.as_deref(), Some("\"slack:T0001:U0LEADX\""));
        assert!(serde_json::from_str::<Identity>("\"bogus\"").is_err());
        assert!(serde_json::from_str::<AgentId>("\"Web\"").is_err());
        assert!(serde_json::from_str::<JobId>("\"x\"").is_err());
    }
}
