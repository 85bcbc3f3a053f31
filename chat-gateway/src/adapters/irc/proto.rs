//! The IRC line format (RFC 1459 / 2812 with IRCv3 message tags): parsing
//! one received line, and the byte budget of one sent `PRIVMSG`.
//!
//! Parsing never panics: a line that does not fit the grammar is an
//! [`ParseError`] that the caller logs and skips.

use std::fmt;

/// Longest line (without tags) the protocol allows, CRLF included.
pub const MAX_LINE_BYTES: usize = 512;
/// Longest received line we accept, tags included (IRCv3 allows 8191 for
/// tags plus 512 for the rest); longer lines are dropped unread.
pub const MAX_RECV_LINE_BYTES: usize = 8191 + MAX_LINE_BYTES;

/// Our own `user@host` as other clients see it, when the server has not
/// shown it to us yet: the longest usernames servers allow are about ten
/// bytes (plus `~` when ident failed) and hostnames at most 63.
pub const WORST_CASE_USER_BYTES: usize = 12;
pub const WORST_CASE_HOST_BYTES: usize = 63;

/// One received IRC message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Message {
    /// IRCv3 tags in order; a value is `None` when the tag has none (or an
    /// empty one), escapes already undone.
    pub tags: Vec<(String, Option<String>)>,
    /// The source (`nick!user@host` or a server name), without the `:`.
    pub source: Option<Source>,
    /// Upper-cased command or three-digit numeric.
    pub command: String,
    /// Middle parameters and the trailing one (without its `:`).
    pub params: Vec<String>,
}

/// A message source: a server (only `nick` set) or a user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Source {
    pub nick: String,
    pub user: Option<String>,
    pub host: Option<String>,
}

/// Why a line was not understood.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParseError {
    Empty,
    NoCommand,
    BadCommand(String),
    BadTags,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Empty => f.write_str("empty line"),
            ParseError::NoCommand => f.write_str("no command"),
            ParseError::BadCommand(c) => write!(f, "invalid command {c:?}"),
            ParseError::BadTags => f.write_str("tags without a message"),
        }
    }
}

impl Message {
    /// Parses one line (with or without its CR LF).
    pub fn parse(line: &str) -> Result<Message, ParseError> {
        let line = line.trim_end_matches(['\r', '\n']);
        let mut rest = line.trim_start_matches(' ');
        if rest.is_empty() {
            return Err(ParseError::Empty);
        }
        let mut msg = Message::default();
        if let Some(after) = rest.strip_prefix('@') {
            let (tags, tail) = after.split_once(' ').ok_or(ParseError::BadTags)?;
            msg.tags = parse_tags(tags);
            rest = tail.trim_start_matches(' ');
        }
        if let Some(after) = rest.strip_prefix(':') {
            let (source, tail) = after.split_once(' ').ok_or(ParseError::NoCommand)?;
            if source.is_empty() {
                return Err(ParseError::NoCommand);
            }
            msg.source = Some(Source::parse(source));
            rest = tail.trim_start_matches(' ');
        }
        let (command, mut params) = match rest.split_once(' ') {
            Some((c, p)) => (c, p),
            None => (rest, ""),
        };
        if command.is_empty() {
            return Err(ParseError::NoCommand);
        }
        let numeric = command.len() == 3 && command.bytes().all(|b| b.is_ascii_digit());
        if !numeric && !command.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(ParseError::BadCommand(command.chars().take(32).collect()));
        }
        msg.command = command.to_ascii_uppercase();
        loop {
            params = params.trim_start_matches(' ');
            if params.is_empty() {
                break;
            }
            if let Some(trailing) = params.strip_prefix(':') {
                msg.params.push(trailing.to_string());
                break;
            }
            match params.split_once(' ') {
                Some((p, tail)) => {
                    msg.params.push(p.to_string());
                    params = tail;
                }
                None => {
                    msg.params.push(params.to_string());
                    break;
                }
            }
        }
        Ok(msg)
    }

    /// The value of tag `key`: `Some(None)` when present without a value.
    pub fn tag(&self, key: &str) -> Option<Option<&str>> {
        self.tags
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_deref())
    }

    /// Parameter `i`, or `""`.
    pub fn param(&self, i: usize) -> &str {
        self.params.get(i).map_or("", String::as_str)
    }

    /// The source's nick (or server name), or `""`.
    pub fn nick(&self) -> &str {
        self.source.as_ref().map_or("", |s| s.nick.as_str())
    }
}

impl Source {
    /// `nick!user@host`, `nick@host` or `server.name`.
    pub fn parse(s: &str) -> Source {
        let (nick_user, host) = match s.split_once('@') {
            Some((a, h)) => (a, Some(h.to_string())),
            None => (s, None),
        };
        let (nick, user) = match nick_user.split_once('!') {
            Some((n, u)) => (n, Some(u.to_string())),
            None => (nick_user, None),
        };
        Source {
            nick: nick.to_string(),
            user,
            host,
        }
    }
}

fn parse_tags(s: &str) -> Vec<(String, Option<String>)> {
    s.split(';')
        .filter(|t| !t.is_empty())
        .map(|t| match t.split_once('=') {
            Some((k, v)) => {
                let v = unescape_tag_value(v);
                (k.to_string(), (!v.is_empty()).then_some(v))
            }
            None => (t.to_string(), None),
        })
        .collect()
}

/// Undoes IRCv3 tag-value escaping: `\:` `;`, `\s` space, `\\` `\`,
/// `\r` CR, `\n` LF; any other escaped character stands for itself and a
/// lone trailing `\` is dropped.
pub fn unescape_tag_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some(':') => out.push(';'),
            Some('s') => out.push(' '),
            Some('\\') => out.push('\\'),
            Some('r') => out.push('\r'),
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

/// Bytes left for the text of `PRIVMSG <target> :<text>` so that the line
/// the server relays (`:nick!user@host PRIVMSG target :text\r\n`) fits in
/// [`MAX_LINE_BYTES`].
pub fn privmsg_text_budget(nick: &str, user: usize, host: usize, target: &str) -> usize {
    let overhead = 1 + nick.len() + 1 + user + 1 + host + 1 // ":nick!user@host "
        + "PRIVMSG ".len()
        + target.len()
        + " :".len()
        + 2; // CRLF
    MAX_LINE_BYTES.saturating_sub(overhead)
}

/// Splits `text` at the last UTF-8 character boundary at or before `max`
/// bytes: the head is never empty (a character longer than `max` is kept
/// whole rather than looping forever) and never splits a character.
pub fn split_at_boundary(text: &str, max: usize) -> (&str, &str) {
    if text.len() <= max {
        return (text, "");
    }
    let mut cut = max.max(1);
    while cut < text.len() && !text.is_char_boundary(cut) {
        cut -= 1;
        if cut == 0 {
            // The first character is longer than `max`: keep it whole.
            cut = text.chars().next().map_or(text.len(), char::len_utf8);
            break;
        }
    }
    text.split_at(cut)
}

/// Cuts `text` into pieces of at most `first` bytes (the first piece) and
/// `rest` bytes (the others), on character boundaries; concatenated they
/// are `text` again.
pub fn split_utf8(text: &str, first: usize, rest: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let (head, mut tail) = split_at_boundary(text, first);
    out.push(head);
    while !tail.is_empty() {
        let (h, t) = split_at_boundary(tail, rest);
        out.push(h);
        tail = t;
    }
    out
}

/// Whether `s` can be sent as a middle parameter (a nick or channel):
/// non-empty, no space, comma, NUL, CR, LF or BEL, and not starting with `:`.
pub fn is_plain_param(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(':')
        && !s
            .chars()
            .any(|c| matches!(c, ' ' | ',' | '\0' | '\r' | '\n' | '\x07'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(nick: &str, user: Option<&str>, host: Option<&str>) -> Option<Source> {
        Some(Source {
            nick: nick.into(),
            user: user.map(Into::into),
            host: host.map(Into::into),
        })
    }

    fn check(line: &str, expected: Message) {
        assert_eq!(Message::parse(line), Ok(expected), "{line:?}");
    }

    fn m(
        tags: &[(&str, Option<&str>)],
        source: Option<Source>,
        command: &str,
        params: &[&str],
    ) -> Message {
        Message {
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.map(Into::into)))
                .collect(),
            source,
            command: command.into(),
            params: params.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn parses_commands_prefixes_params_and_trailing() {
        check(
            "PING :irc.example.net\r\n",
            m(&[], None, "PING", &["irc.example.net"]),
        );
        check("ping x", m(&[], None, "PING", &["x"]));
        check(
            ":alice!~alice@127.0.0.1 PRIVMSG #ops :!run uptime on all\r\n",
            m(
                &[],
                src("alice", Some("~alice"), Some("127.0.0.1")),
                "PRIVMSG",
                &["#ops", "!run uptime on all"],
            ),
        );
        check(
            ":irc.example.net 001 fleetcmd :Welcome to the net",
            m(
                &[],
                src("irc.example.net", None, None),
                "001",
                &["fleetcmd", "Welcome to the net"],
            ),
        );
        // Several spaces between params, empty trailing, colon inside trailing.
        check(
            ":s  CAP  *  LS  :",
            m(&[], src("s", None, None), "CAP", &["*", "LS", ""]),
        );
        check(
            ":n@h KICK #c victim :bye: now",
            m(
                &[],
                src("n", None, Some("h")),
                "KICK",
                &["#c", "victim", "bye: now"],
            ),
        );
        check("JOIN #a", m(&[], None, "JOIN", &["#a"]));
        check("QUIT", m(&[], None, "QUIT", &[]));
    }

    #[test]
    fn parses_and_unescapes_tags() {
        check(
            "@account=alice;bot;time=2024-01-01T00:00:00.000Z;+draft/reply=a\\sb\\:c\\\\d\\ne \
             :alice!a@h PRIVMSG #ops :hi",
            m(
                &[
                    ("account", Some("alice")),
                    ("bot", None),
                    ("time", Some("2024-01-01T00:00:00.000Z")),
                    ("+draft/reply", Some("a b;c\\d\ne")),
                ],
                src("alice", Some("a"), Some("h")),
                "PRIVMSG",
                &["#ops", "hi"],
            ),
        );
        // Empty value = no value; unknown escape = the character; trailing backslash dropped.
        check(
            "@a=;b=x\\yz\\ PING",
            m(&[("a", None), ("b", Some("xyz"))], None, "PING", &[]),
        );
        check("@;; PING", m(&[], None, "PING", &[]));
        let msg = Message::parse("@account=* :a!b@c PRIVMSG x :y").expect("valid line");
        assert_eq!(msg.tag("account"), Some(Some("*")));
        assert_eq!(msg.tag("bot"), None);
    }

    #[test]
    fn malformed_lines_are_errors_not_panics() {
        for (line, err) in [
            ("", ParseError::Empty),
            ("\r\n", ParseError::Empty),
            ("   ", ParseError::Empty),
            ("@tags-only", ParseError::BadTags),
            (":prefix-only", ParseError::NoCommand),
            (": PRIVMSG x", ParseError::NoCommand),
            ("@a=b :src ", ParseError::NoCommand),
            (
                "PRIV\u{e9}MSG x",
                ParseError::BadCommand("PRIV\u{e9}MSG".into()),
            ),
            ("12 x", ParseError::BadCommand("12".into())),
            ("1234 x", ParseError::BadCommand("1234".into())),
            ("\x01ACTION x", ParseError::BadCommand("\x01ACTION".into())),
        ] {
            assert_eq!(Message::parse(line), Err(err), "{line:?}");
        }
        // Arbitrary bytes (made lossy UTF-8) never panic.
        for i in 0..=255u8 {
            let line = String::from_utf8_lossy(&[b'@', i, b' ', b':', i, b' ', i, b' ', b':', i])
                .into_owned();
            let _ = Message::parse(&line);
        }
    }

    #[test]
    fn sources() {
        assert_eq!(
            Source::parse("n!u@h"),
            Source {
                nick: "n".into(),
                user: Some("u".into()),
                host: Some("h".into())
            }
        );
        assert_eq!(Source::parse("irc.example.net").user, None);
    }

    #[test]
    fn budget_counts_the_relayed_prefix_and_crlf() {
        // ":bot!~bot@127.0.0.1 PRIVMSG #ops :" is 34 bytes, + CRLF.
        assert_eq!(privmsg_text_budget("bot", 4, 9, "#ops"), 512 - 34 - 2);
        assert_eq!(privmsg_text_budget(&"n".repeat(600), 1, 1, "#x"), 0);
    }

    #[test]
    fn splits_only_on_char_boundaries() {
        // "é" is 2 bytes, "€" 3, "𝄞" 4.
        let text = "aé€𝄞".repeat(20);
        for max in 1..=12 {
            let parts = split_utf8(&text, max, max);
            assert_eq!(parts.concat(), text, "max {max}");
            for p in &parts {
                assert!(!p.is_empty());
                assert!(p.len() <= max.max(4), "{p:?} over {max}");
            }
        }
        assert_eq!(split_utf8("abc", 10, 10), vec!["abc"]);
        assert_eq!(split_utf8("", 10, 10), vec![""]);
        assert_eq!(split_utf8("€€", 4, 2), vec!["€", "€"]);
        assert_eq!(split_at_boundary("𝄞x", 2), ("𝄞", "x"));
    }

    #[test]
    fn plain_params() {
        for (s, ok) in [
            ("#ops", true),
            ("alice", true),
            ("", false),
            ("#a,#b", false),
            ("a b", false),
            (":x", false),
            ("x\r\nQUIT", false),
        ] {
            assert_eq!(is_plain_param(s), ok, "{s:?}");
        }
    }
}
