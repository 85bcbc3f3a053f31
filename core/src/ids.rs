//! Identifiers built only through their parsers: agent names, job ids
//! (UUIDv7) with their short form and the references people type for them,
//! and the stable chat/CLI identities of ARCHITECTURE.md invariant 8.

use std::fmt;

use serde::{Deserialize, Serialize};

// What an error quotes of a refused identifier.
use crate::terminal::excerpt as shown;

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

    /// The id people see and type: the last 12 hex digits, 48 random bits
    /// of the UUIDv7. The leading digits are a millisecond timestamp, so
    /// jobs submitted together share them; the tail is what differs. The
    /// controller refuses a job whose short id a stored job already has, so
    /// a short id names one job per controller.
    ///
    /// ```
    /// use fleetcmd_core::ids::JobId;
    /// let id = JobId::parse("01890a5d-ac96-774b-bcce-b302099a8057").unwrap();
    /// assert_eq!(id.short().as_str(), "b302099a8057");
    /// ```
    pub fn short(&self) -> ShortJobId {
        ShortJobId(self.0[36 - SHORT_JOB_ID_LEN..].to_string())
    }

    /// The creation time in unix milliseconds (the first 48 bits of a v7 UUID).
    pub fn unix_ms(&self) -> u64 {
        let hex: String = self.0.chars().filter(|c| *c != '-').take(12).collect();
        // The parser guarantees 12 hex digits here.
        u64::from_str_radix(&hex, 16).unwrap_or(0)
    }
}

/// How a job id given as text is shown to people: its short id when it is
/// a job id ([`JobId::short`]), otherwise the text as it is (e.g. an old or
/// foreign record), so nothing is hidden.
///
/// ```
/// use fleetcmd_core::ids::short_form;
/// assert_eq!(short_form("01890a5d-ac96-774b-bcce-b302099a8057"), "b302099a8057");
/// assert_eq!(short_form("job-1"), "job-1");
/// ```
pub fn short_form(id: &str) -> &str {
    match JobId::parse(id) {
        Ok(_) => &id[36 - SHORT_JOB_ID_LEN..],
        Err(_) => id,
    }
}

/// How many fresh ids a submitter (gateway, CLI) tries for one job when
/// the controller says each one's short id names a stored job already.
/// With 48 random bits a second try is all but never needed.
pub const SHORT_ID_ATTEMPTS: usize = 3;

/// Hex digits in a [`ShortJobId`].
pub const SHORT_JOB_ID_LEN: usize = 12;

/// Fewest characters of a full job id accepted as a prefix: one or two
/// characters would name whatever single job or request there is.
pub const MIN_JOB_ID_PREFIX_LEN: usize = 8;

/// A job's short id ([`JobId::short`]): exactly 12 lowercase hex digits.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ShortJobId(String);

impl ShortJobId {
    /// Parses exactly 12 lowercase hex digits.
    pub fn parse(s: &str) -> Result<ShortJobId, IdError> {
        if s.len() == SHORT_JOB_ID_LEN && is_lower_hex(s) {
            Ok(ShortJobId(s.to_string()))
        } else {
            Err(IdError::JobId {
                input: shown(s),
                reason: "a short job id is exactly 12 lowercase hex digits".into(),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

/// How a person names a job: the full id, its short id, or a prefix of the
/// full id of at least [`MIN_JOB_ID_PREFIX_LEN`] characters.
///
/// The forms cannot be confused: a prefix longer than 8 characters has a
/// hyphen at position 9 and a short id never has one, so 12 hex digits are
/// always a short id. A short id names one job (the controller refuses a
/// second one at submit); a prefix names one job only while no other job
/// shares it, and lookups refuse it as ambiguous otherwise.
///
/// ```
/// use fleetcmd_core::ids::{JobId, JobRef};
/// let id = JobId::parse("01890a5d-ac96-774b-bcce-b302099a8057").unwrap();
/// for typed in ["b302099a8057", "B302099A8057", "01890a5d-ac96", id.as_str()] {
///     assert!(JobRef::parse(typed).unwrap().matches(id.as_str()), "{typed}");
/// }
/// // The last 9 digits: neither a short id nor the start of a full id.
/// assert!(JobRef::parse("2099a8057").is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobRef {
    Full(JobId),
    Short(ShortJobId),
    Prefix(String),
}

impl JobRef {
    /// Parses what someone typed; surrounding whitespace is ignored and
    /// upper-case hex digits are taken as lower-case.
    pub fn parse(s: &str) -> Result<JobRef, IdError> {
        let typed = s.trim().to_ascii_lowercase();
        let err = |reason: &str| IdError::JobId {
            input: shown(s.trim()),
            reason: reason.to_string(),
        };
        if typed.len() == 36 {
            return JobId::parse(&typed).map(JobRef::Full);
        }
        if typed.len() == SHORT_JOB_ID_LEN && is_lower_hex(&typed) {
            return Ok(JobRef::Short(ShortJobId(typed)));
        }
        if typed.len() < MIN_JOB_ID_PREFIX_LEN {
            return Err(err(
                "give the 12-digit short id, the full id, or at least 8 characters of the full id",
            ));
        }
        if typed.len() > 36 {
            return Err(err("longer than a full job id (36 characters)"));
        }
        for (i, c) in typed.bytes().enumerate() {
            let fits = match i {
                8 | 13 | 18 | 23 => c == b'-',
                14 => c == b'7',
                _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
            };
            if !fits {
                return Err(err(
                    "neither a short id (exactly 12 hex digits) nor the start of a full id \
                     (hex digits with hyphens after the 8th, 12th, 16th and 20th)",
                ));
            }
        }
        Ok(JobRef::Prefix(typed))
    }

    /// Whether the job with full id `id` is the one named.
    pub fn matches(&self, id: &str) -> bool {
        match self {
            JobRef::Full(full) => full.as_str() == id,
            JobRef::Short(short) => id.len() == 36 && id.ends_with(short.as_str()),
            JobRef::Prefix(p) => id.starts_with(p.as_str()),
        }
    }

    /// The text as it will be looked up (trimmed, lower-case).
    pub fn as_str(&self) -> &str {
        match self {
            JobRef::Full(full) => full.as_str(),
            JobRef::Short(short) => short.as_str(),
            JobRef::Prefix(p) => p,
        }
    }
}

impl fmt::Display for JobRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Longest platform name (the part of an identity before the first `:`).
pub const MAX_PLATFORM_BYTES: usize = 32;

/// Whether `s` is a platform name: `[a-z][a-z0-9-]*`, at most
/// [`MAX_PLATFORM_BYTES`]. Core knows no list of platforms: each chat
/// adapter mints identities of its own platform and checks their form, so
/// an agent built before a platform existed accepts its users' jobs.
pub fn valid_platform(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_PLATFORM_BYTES
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// A requester's stable identity (never a display name): `platform:rest`,
/// e.g. `slack:T0001:U024BE7LH`, `irc:libera:alice!alice@ops.example.com`,
/// `matrix:@alice:example.org`.
///
/// Core checks only the shape every platform shares ([`Identity::parse`]);
/// the adapter that mints an identity checks its platform's own form (the
/// list of forms is ARCHITECTURE.md invariant 8). Two conventions carry
/// meaning across platforms:
/// - **place**: when the part after the platform is `place:user` and the
///   place starts with a letter or digit (a Slack team, an IRC network, a
///   Mattermost server), the identity belongs to that place; its jobs and
///   approvals come only from channels of the same place
///   (`rbac::on_own_platform`). Platforms whose user ids are global (Matrix
///   `@user:server`) have no place.
/// - **person**: everything from the first `!` on is session detail, not
///   the person ([`Identity::person`]); adapters never put `!` in the
///   stable part.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Identity(String);

/// Maximum length of an identity in bytes.
pub const MAX_IDENTITY_BYTES: usize = 256;

/// U+2800, the blank Braille pattern: a printable character every font
/// draws as nothing. Output keeps it (Braille sparklines use the block);
/// an identity refuses it, so two identities never differ by a blank.
const BLANK_GLYPH: char = '\u{2800}';

impl Identity {
    /// Parses `platform:rest`: a platform name ([`valid_platform`]), a
    /// non-empty rest, at most 256 bytes, no whitespace, control or
    /// invisible characters (`terminal::is_unsafe`), and no empty place or person (`slack::U1`,
    /// `irc:net:!u@h`).
    pub fn parse(s: &str) -> Result<Identity, IdError> {
        let err = |reason: &str| IdError::Identity {
            input: shown(s),
            reason: reason.to_string(),
        };
        if s.len() > MAX_IDENTITY_BYTES {
            return Err(err("longer than 256 bytes"));
        }
        if s.chars()
            .any(|c| c.is_whitespace() || crate::terminal::is_unsafe(c) || c == BLANK_GLYPH)
        {
            return Err(err("contains whitespace, control or invisible characters"));
        }
        let (platform, rest) = s
            .split_once(':')
            .ok_or_else(|| err("expected `<platform>:...`"))?;
        if !valid_platform(platform) {
            return Err(err(
                "the platform (before the first `:`) must be 1-32 lowercase letters, digits or `-`, starting with a letter",
            ));
        }
        if rest.is_empty() {
            return Err(err("nothing after the platform"));
        }
        if rest.starts_with(':') || rest.starts_with('!') {
            return Err(err("empty place or user after the platform"));
        }
        if let Some((place, who)) = rest.split_once(':')
            && has_place(place)
            && (who.is_empty() || who.starts_with('!'))
        {
            return Err(err("empty user after the place"));
        }
        Ok(Identity(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Who this identity is as a person, for "never the requester" and
    /// "each approver once": the identity up to its first `!` (the rest is
    /// session detail), ASCII case folded. An IRC `nick!user@host` is its
    /// network and nick: the user part is whatever the client sends where
    /// the server runs no identd, and a host is shared by everyone behind
    /// it, so one person reconnecting as `alice!~a2@h` is still alice
    /// (found by an outside test: a requester approved their own job under
    /// another user name). Folding case can only merge identities, never
    /// split one person in two.
    ///
    /// ```
    /// use fleetcmd_core::ids::Identity;
    /// let a = Identity::parse("irc:net:Alice!~a1@h1").unwrap();
    /// let b = Identity::parse("irc:net:alice!~a2@h2").unwrap();
    /// assert_eq!(a.person(), b.person());
    /// assert_eq!(Identity::parse("slack:T1:U1").unwrap().person(), "slack:t1:u1");
    /// ```
    pub fn person(&self) -> String {
        let stable = self.0.split_once('!').map_or(self.0.as_str(), |(p, _)| p);
        stable.to_ascii_lowercase()
    }

    /// The place the identity belongs to (a Slack team, an IRC network, a
    /// Mattermost server), if its platform has places: the part between the
    /// first and second `:` when it starts with a letter or digit.
    ///
    /// ```
    /// use fleetcmd_core::ids::Identity;
    /// assert_eq!(Identity::parse("irc:libera:alice").unwrap().place(), Some("libera"));
    /// assert_eq!(Identity::parse("matrix:@alice:example.org").unwrap().place(), None);
    /// assert_eq!(Identity::parse("console:alice").unwrap().place(), None);
    /// ```
    pub fn place(&self) -> Option<&str> {
        let (_, rest) = self.0.split_once(':')?;
        let (place, _) = rest.split_once(':')?;
        has_place(place).then_some(place)
    }

    /// Whether two identities are the same person ([`Identity::person`]).
    pub fn same_person(&self, other: &Identity) -> bool {
        self.person() == other.person()
    }

    /// The platform, e.g. `slack`.
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

/// Whether the first part after the platform names a place (see [`Identity`]).
fn has_place(part: &str) -> bool {
    part.as_bytes()
        .first()
        .is_some_and(u8::is_ascii_alphanumeric)
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
string_newtype!(ShortJobId);
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

    #[test]
    fn short_ids_are_the_random_tail() {
        let id = JobId::parse("01890a5d-ac96-774b-bcce-b302099a8057").ok();
        assert_eq!(
            id.map(|i| i.short().to_string()).as_deref(),
            Some("b302099a8057")
        );
        for (input, ok) in [
            ("b302099a8057", true),
            ("B302099A8057", false),
            ("b302099a805", false),
            ("b302099a80571", false),
            ("b302099a805g", false),
            ("b302-99a8057", false),
            ("", false),
        ] {
            assert_eq!(ShortJobId::parse(input).is_ok(), ok, "{input:?}");
        }
    }

    fn check_ref(input: &str, expected: Result<JobRef, &str>) {
        match (JobRef::parse(input), expected) {
            (Ok(got), Ok(want)) => assert_eq!(got, want, "{input:?}"),
            (Err(e), Err(part)) => assert!(e.to_string().contains(part), "{input:?}: {e}"),
            (got, want) => panic!("{input:?}: got {got:?}, expected {want:?}"),
        }
    }

    #[test]
    fn job_refs() {
        let full = "01890a5d-ac96-774b-bcce-b302099a8057";
        let short = |s: &str| JobRef::Short(ShortJobId(s.into()));
        let prefix = |s: &str| JobRef::Prefix(s.into());
        for (input, expected) in [
            (full, JobId::parse(full).map(JobRef::Full).map_err(|_| "")),
            (
                " 01890A5D-AC96-774B-BCCE-B302099A8057\n",
                JobId::parse(full).map(JobRef::Full).map_err(|_| ""),
            ),
            ("b302099a8057", Ok(short("b302099a8057"))),
            ("B302099A8057", Ok(short("b302099a8057"))),
            // Twelve hex digits are a short id, never a prefix: a prefix
            // that long has a hyphen.
            ("01890a5dac96", Ok(short("01890a5dac96"))),
            ("01890a5d", Ok(prefix("01890a5d"))),
            ("01890a5d-", Ok(prefix("01890a5d-"))),
            ("01890a5d-ac96-774b", Ok(prefix("01890a5d-ac96-774b"))),
            ("01890a5d-ac96-7", Ok(prefix("01890a5d-ac96-7"))),
            ("", Err("give the 12-digit short id")),
            ("0189", Err("give the 12-digit short id")),
            ("0189a5d", Err("at least 8 characters")),
            ("099a8057", Ok(prefix("099a8057"))),
            ("2099a8057", Err("neither a short id")),
            ("b302099a80571", Err("neither a short id")),
            ("01890a5d-ac96-474b", Err("neither a short id")),
            ("01890a5d_ac96", Err("neither a short id")),
            (
                "01890a5d-ac96-774b-bcce-b302099a805",
                Ok(prefix("01890a5d-ac96-774b-bcce-b302099a805")),
            ),
            (
                "01890a5d-ac96-474b-bcce-b302099a8057",
                Err("expected a version 7 UUID"),
            ),
            (&format!("{full}0"), Err("longer than a full job id")),
            ("zzzzzzzzzzzz", Err("neither a short id")),
        ] {
            check_ref(input, expected);
        }
    }

    #[test]
    fn job_refs_match_their_job_only() {
        let a = "01890a5d-ac96-774b-bcce-b302099a8057";
        let b = "01890a5d-ac96-774b-bcce-00000000a057";
        for (typed, hits_a, hits_b) in [
            (a, true, false),
            ("b302099a8057", true, false),
            ("00000000a057", false, true),
            ("01890a5d-ac96-774b", true, true),
            ("01890a5d-ac96-774b-bcce-b", true, false),
        ] {
            let r = JobRef::parse(typed).expect(typed);
            assert_eq!((r.matches(a), r.matches(b)), (hits_a, hits_b), "{typed}");
        }
        // A short id is never a match for a string that is not a full id.
        let r = JobRef::parse("b302099a8057").expect("short");
        assert!(!r.matches("b302099a8057"));
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
            ("mattermost:chat.example.com:8065:abc123", true),
            ("irc:libera:alice!al@ops.example.com", true),
            ("irc:libera:alice", true),
            ("irc:libera:!u@h", false),
            ("irc::alice!a@h", false),
            ("xmpp:alice@example.com", true),
            ("console:alice", true),
            ("console:", false),
            ("console:!x", false),
            ("cli:CN=alice,O=ops", true),
            ("webhook:alertmanager", true),
            // Platforms core has never heard of: any well-formed one.
            ("matrix:@alice:example.org", true),
            ("zulip:chat.example.com:42", true),
            ("x-team-chat:u1", true),
            // Malformed whatever the platform.
            ("Zulip:chat.example.com:42", false),
            ("1chat:u1", false),
            ("-chat:u1", false),
            ("ch_at:u1", false),
            (":u1", false),
            (&format!("{}:u1", "p".repeat(33)), false),
            ("slack:T0001:U 1", false),
            ("slack:T0001:U\u{7}1", false),
            ("matrix:@a\u{202e}:b", false),
            ("zz:a\u{2800}b", false),
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
