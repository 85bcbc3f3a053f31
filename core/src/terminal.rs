//! Text from the fleet (command output, what agents report, audit fields)
//! made inert for a terminal: every character that a terminal interprets
//! rather than shows, or that changes what a reader sees without being
//! visible, is replaced by a visible escape (`\x1b`, `\r`, `\u{202e}`), so
//! output cannot move the cursor, set the title or clipboard (OSC),
//! overwrite a line with a carriage return or reorder text with bidi
//! overrides — and so cannot pass for another host's lines.
//!
//! ```
//! use fleetcmd_core::terminal::escape;
//! assert_eq!(escape("ok\x1b]52;c;aGk=\x07\n"), "ok\\x1b]52;c;aGk=\\x07\n");
//! assert_eq!(escape("web-1: fine"), "web-1: fine");
//! ```

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether `c` must not reach a terminal as is: C0 controls but newline and
/// tab, DEL, C1 controls (U+0080–U+009F: a terminal may read U+009B as CSI),
/// and invisible or bidirectional formatting characters (zero-width
/// characters, LRM/RLM/ALM, embeddings, overrides, isolates, line and
/// paragraph separators, the BOM).
pub fn is_unsafe(c: char) -> bool {
    match c {
        '\n' | '\t' => false,
        c if c.is_control() => true, // C0, DEL, C1
        '\u{00AD}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{180E}' => true,
        '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{206F}' => true,
        '\u{3164}' | '\u{FEFF}' | '\u{FFA0}' | '\u{FFF9}'..='\u{FFFB}' => true,
        '\u{E0000}'..='\u{E007F}' => true, // tag characters
        _ => false,
    }
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\r' => out.push_str("\\r"),
        c if (c as u32) < 0x100 => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
}

/// `s` with every [`is_unsafe`] character escaped. A backslash stays as it
/// is: the escapes are for a human reader, not to be decoded again.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if is_unsafe(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Bytes (command output, which need not be UTF-8) escaped as [`escape`]
/// does, with each byte that is not part of valid UTF-8 shown as `\xNN`.
/// Returns the escaped text and how many bytes at the end were held back
/// because they may be the start of a character that continues in the next
/// piece (at most 3; pass `last = true` to escape them too).
pub fn escape_bytes(bytes: &[u8], last: bool) -> (String, usize) {
    let mut out = String::with_capacity(bytes.len());
    let mut held = 0;
    let mut chunks = bytes.utf8_chunks().peekable();
    while let Some(chunk) = chunks.next() {
        out.push_str(&escape(chunk.valid()));
        let invalid = chunk.invalid();
        // An incomplete sequence at the very end is not invalid yet.
        if chunks.peek().is_none() && !last && !invalid.is_empty() && {
            let start = bytes.len() - invalid.len();
            std::str::from_utf8(&bytes[start..])
                .err()
                .is_some_and(|e| e.error_len().is_none())
        } {
            held = invalid.len();
            break;
        }
        for b in invalid {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    (out, held)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_a_terminal_would_interpret() {
        let cases: &[(&str, &str)] = &[
            ("plain text\twith tab\n", "plain text\twith tab\n"),
            ("\x1b[2J\x1b[H", "\\x1b[2J\\x1b[H"),
            ("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07"),
            ("db-1: ok\rweb-1: spoofed", "db-1: ok\\rweb-1: spoofed"),
            ("bell\x07del\x7f", "bell\\x07del\\x7f"),
            ("c1 csi \u{9b}31m", "c1 csi \\x9b31m"),
            ("abc\u{202e}fed", "abc\\u{202e}fed"),
            ("zero\u{200b}width", "zero\\u{200b}width"),
            ("bom\u{feff}", "bom\\u{feff}"),
            ("\u{2066}iso\u{2069}", "\\u{2066}iso\\u{2069}"),
            ("héllo wörld ✓ 日本", "héllo wörld ✓ 日本"),
            ("back\\slash", "back\\slash"),
        ];
        for (input, want) in cases {
            assert_eq!(escape(input), *want, "{input:?}");
        }
    }

    #[test]
    fn bytes_hold_back_a_split_character_and_show_invalid_ones() {
        let check = |bytes: &[u8], last: bool, want: &str, held: usize| {
            assert_eq!(
                escape_bytes(bytes, last),
                (want.to_string(), held),
                "{bytes:?}"
            );
        };
        check(b"ok\n", false, "ok\n", 0);
        check(b"a\xffb", false, "a\\xffb", 0);
        check(b"a\xe2\x9c", false, "a", 2);
        check(b"a\xe2\x9c", true, "a\\xe2\\x9c", 0);
        check("a✓".as_bytes(), false, "a✓", 0);
        check(b"\x1b[31mred", false, "\\x1b[31mred", 0);
        check(b"\xc2\x9b", false, "\\x9b", 0);
    }
}
