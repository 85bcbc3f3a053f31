//! Everything `fleetcmd` prints that came from the fleet — command output,
//! agent ids, versions and facts, job fields, audit records, controller
//! messages — goes through here, so that output cannot drive the terminal
//! (cursor movement, OSC title and clipboard sequences, a carriage return
//! that overwrites a line, bidi overrides) or pass for another host's lines.
//! The rules are `fleetcmd_core::terminal`'s; this module applies them to
//! the CLI's output streams.
//!
//! `--raw` passes bytes through unchanged, for pipes and files only: on a
//! terminal it is refused, since that is exactly where raw bytes do harm.

use std::borrow::Cow;
use std::io::{IsTerminal, Write};

use fleetcmd_core::terminal::{escape_bytes, is_unsafe};

use crate::{Conn, Failure, usage};

/// How fleet-supplied text reaches stdout and stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mode {
    raw: bool,
}

impl Mode {
    /// Escaped output (the default).
    pub const ESCAPED: Mode = Mode { raw: false };

    /// The mode `--raw` asks for; refused when stdout is a terminal.
    pub fn from_conn(conn: &Conn) -> Result<Mode, Failure> {
        Mode::new(conn.raw, std::io::stdout().is_terminal())
    }

    fn new(raw: bool, stdout_is_terminal: bool) -> Result<Mode, Failure> {
        if raw && stdout_is_terminal {
            return Err(usage(
                "--raw: stdout is a terminal; raw output could rewrite it (use --raw only with a pipe or a file)",
            ));
        }
        Ok(Mode { raw })
    }

    /// Escaped stdout (or raw, as the mode says).
    pub fn stdout(self) -> Escaped<std::io::StdoutLock<'static>> {
        Escaped::new(std::io::stdout().lock(), self.raw)
    }

    /// Escaped stderr; raw only if stderr is not a terminal either.
    pub fn stderr(self) -> Escaped<std::io::StderrLock<'static>> {
        let err = std::io::stderr();
        let raw = self.raw && !err.is_terminal();
        Escaped::new(err.lock(), raw)
    }

    /// JSON text for stdout: the characters `Escaped` would escape are
    /// written as JSON `\u` escapes instead (they can only occur inside
    /// strings, where such an escape means the same character), so the
    /// output stays valid JSON and still cannot drive a terminal.
    pub fn json<'a>(self, s: &'a str) -> Cow<'a, str> {
        if self.raw || !s.chars().any(is_unsafe) {
            return Cow::Borrowed(s);
        }
        let mut out = String::with_capacity(s.len() + 16);
        for c in s.chars() {
            if is_unsafe(c) {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            } else {
                out.push(c);
            }
        }
        Cow::Owned(out)
    }
}

/// A writer that escapes what passes through it (unless raw). Bytes that
/// may begin a UTF-8 character continued by the next write are held until
/// then (or shown as `\xNN` when the writer is dropped).
pub struct Escaped<W: Write> {
    inner: W,
    raw: bool,
    held: Vec<u8>,
}

impl<W: Write> Escaped<W> {
    pub fn new(inner: W, raw: bool) -> Escaped<W> {
        Escaped {
            inner,
            raw,
            held: Vec::new(),
        }
    }

    /// Writes `s` unescaped: for text this program made (JSON that
    /// `Mode::json` already made safe).
    pub fn write_verbatim(&mut self, s: &str) -> std::io::Result<()> {
        self.inner.write_all(s.as_bytes())
    }
}

impl<W: Write> Write for Escaped<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.raw {
            return self.inner.write(buf);
        }
        self.held.extend_from_slice(buf);
        let (text, held) = escape_bytes(&self.held, false);
        self.inner.write_all(text.as_bytes())?;
        let done = self.held.len() - held;
        self.held.drain(..done);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write> Drop for Escaped<W> {
    fn drop(&mut self) {
        if !self.held.is_empty() {
            let (text, _) = escape_bytes(&self.held, true);
            let _ = self.inner.write_all(text.as_bytes());
        }
        let _ = self.inner.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn through(raw: bool, writes: &[&[u8]]) -> Vec<u8> {
        let mut buf = Vec::new();
        {
            let mut w = Escaped::new(&mut buf, raw);
            for b in writes {
                w.write_all(b).expect("write to a Vec");
            }
        }
        buf
    }

    /// (raw, the writes, what comes out)
    type Case<'a> = (bool, &'a [&'a [u8]], &'a [u8]);

    #[test]
    fn escapes_across_writes_and_passes_raw_through() {
        let cases: &[Case] = &[
            (false, &[b"web-1: ok\n"], b"web-1: ok\n"),
            (false, &[b"\x1b]0;pwned\x07\n"], b"\\x1b]0;pwned\\x07\n"),
            (
                false,
                &[b"db-1: fine\rweb-1: spoofed\n"],
                b"db-1: fine\\rweb-1: spoofed\n",
            ),
            // A character split over two writes is kept whole.
            (false, &[b"\xe2\x9c", b"\x93\n"], "✓\n".as_bytes()),
            // A split C1 CSI is still caught once it is complete.
            (false, &[b"\xc2", b"\x9b2J"], b"\\x9b2J"),
            // An unfinished character at the end is shown, not dropped.
            (false, &[b"end\xe2\x9c"], b"end\\xe2\\x9c"),
            (
                true,
                &[b"\x1b[31mred\x1b[0m\r\n"],
                b"\x1b[31mred\x1b[0m\r\n",
            ),
        ];
        for (raw, writes, want) in cases {
            assert_eq!(
                through(*raw, writes),
                *want,
                "{writes:?} raw={raw}: {}",
                String::from_utf8_lossy(&through(*raw, writes))
            );
        }
    }

    #[test]
    fn raw_is_refused_on_a_terminal() {
        assert!(Mode::new(true, true).is_err());
        assert_eq!(Mode::new(true, false).ok(), Some(Mode { raw: true }));
        assert_eq!(Mode::new(false, true).ok(), Some(Mode::ESCAPED));
    }

    #[test]
    fn json_stays_json() {
        let m = Mode::ESCAPED;
        assert_eq!(m.json(r#"{"a":"x\u001b"}"#), r#"{"a":"x\u001b"}"#);
        assert_eq!(
            m.json("{\"a\":\"x\u{202e}y\u{9b}\"}"),
            r#"{"a":"x\u202ey\u009b"}"#
        );
        let tag: String = m.json("\u{e0001}").into_owned();
        assert_eq!(tag, r"\udb40\udc01");
        let v: serde_json::Value = serde_json::from_str(&format!("\"{tag}\"")).expect("valid JSON");
        assert_eq!(v, "\u{e0001}");
    }
}
