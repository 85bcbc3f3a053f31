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
/// and every character [`is_format`] names.
pub fn is_unsafe(c: char) -> bool {
    match c {
        '\n' | '\t' => false,
        c if c.is_control() => true, // C0, DEL, C1
        c => is_format(c),
    }
}

/// Characters that change what a reader sees without being visible
/// themselves: Unicode format characters (general category Cf: bidi marks,
/// embeddings, overrides and isolates, zero-width space and joiners, word
/// joiner, invisible operators, soft hyphen, BOM, interlinear annotation,
/// tags, ...), line and paragraph separators, private-use characters, and
/// characters that render as nothing (Hangul fillers, the combining
/// grapheme joiner, Khmer inherent vowels, Mongolian and Unicode variation
/// selectors, and the unassigned default-ignorable blocks FFF0–FFF8 and
/// E0080–E0FFF, which a newer font or terminal may render as nothing).
/// Variation selectors cost an emoji its presentation choice in output
/// (`❤\u{fe0f}`), the price of one list.
/// One list for everything: argument values refuse these (unless
/// `allow_format_chars`), and the CLI and chat escape or replace them in
/// what the fleet sends. Written out rather than taken from a Unicode table
/// so the agent carries no general-category tables; Cf as of Unicode 15.1.
pub fn is_format(c: char) -> bool {
    matches!(
        u32::from(c),
        0x00AD
            | 0x034F
            | 0x0600..=0x0605
            | 0x061C
            | 0x06DD
            | 0x070F
            | 0x0890..=0x0891
            | 0x08E2
            | 0x115F..=0x1160
            | 0x17B4..=0x17B5
            | 0x180B..=0x180F
            | 0x200B..=0x200F
            | 0x2028..=0x202E
            | 0x2060..=0x206F
            | 0x3164
            | 0xE000..=0xF8FF
            | 0xFE00..=0xFE0F
            | 0xFEFF
            | 0xFFA0
            | 0xFFF0..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0000..=0xE0FFF
            | 0xF0000..=0xFFFFD
            | 0x100000..=0x10FFFD
    )
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

/// Characters of user input a reply quotes at most (see [`excerpt`]).
pub const EXCERPT_CHARS: usize = 100;

/// A bounded, one-line, inert excerpt of user input for a reply or an
/// error that quotes it: at most [`EXCERPT_CHARS`] characters and then `…`,
/// with newlines and tabs shown as `\n` and `\t`, every [`is_unsafe`]
/// character escaped as [`escape`] does, and backticks shown as `'` so the
/// excerpt cannot close the code span a reply puts it in. A 100 KB message
/// is answered with 100 characters of it, not echoed back.
///
/// ```
/// use fleetcmd_core::terminal::excerpt;
/// assert_eq!(excerpt("rn`x`\nboom"), "rn'x'\\nboom");
/// assert_eq!(excerpt(&"a".repeat(5000)).chars().count(), 101);
/// ```
pub fn excerpt(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == EXCERPT_CHARS {
            out.push('…');
            break;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '`' => out.push('\''),
            c if is_unsafe(c) => push_escaped(&mut out, c),
            c => out.push(c),
        }
    }
    out
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
    fn what_arguments_refuse_as_invisible_the_terminal_escapes() {
        // One list: every character an argument refuses as invisible or
        // formatting is escaped in output too (an outside test found
        // Arabic number signs, musical format controls, the combining
        // grapheme joiner and private use shown raw).
        for c in [
            '\u{0600}',
            '\u{034F}',
            '\u{180B}',
            '\u{E000}',
            '\u{1D173}',
            '\u{1BCA0}',
            '\u{F0000}',
            '\u{E0001}',
            // Default-ignorable code points (found by an outside test):
            // variation selectors, unassigned specials and tag blocks.
            '\u{FE0F}',
            '\u{FE00}',
            '\u{FFF0}',
            '\u{FFF8}',
            '\u{E0100}',
            '\u{E01EF}',
            '\u{E0FFF}',
        ] {
            assert!(is_format(c) && is_unsafe(c), "{c:?}");
            assert_eq!(escape(&c.to_string()), format!("\\u{{{:x}}}", c as u32));
        }
        assert!(!is_unsafe('é') && !is_unsafe('日') && !is_unsafe('\u{1F600}'));
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
