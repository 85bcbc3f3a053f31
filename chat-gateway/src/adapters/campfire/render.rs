//! Replies as Campfire message HTML.
//!
//! Campfire stores every bot message as Action Text rich text: whatever the
//! bot posts (the webhook response body, `text/plain` included, or the body
//! of a POST to the room's bot URL) is parsed as HTML and sanitized to
//! Action Text's tags. So every piece of a [`Reply`] is HTML-escaped here,
//! output goes in `<pre>`, and mentions and command prefixes are broken
//! with invisible characters so nothing we post can mention anyone (a
//! Campfire mention is an `<action-text-attachment>`, which escaping
//! already makes plain text), wake another bot, or look like a command.

use std::fmt::Write as _;

use crate::adapters::Reply;
use crate::render::sanitize;

/// Largest message body we post, in bytes of HTML. Campfire has no
/// documented limit for upstream installs (forks cap bodies at 64 KiB);
/// staying under it keeps one reply one message.
pub const MAX_MESSAGE_BYTES: usize = 60_000;
/// Room kept for the closing "not shown" notes when a reply is cut.
const RESERVE: usize = 600;

/// U+2060 WORD JOINER after every `@`, so `@channel`, `@all` or a user's
/// name never reads as a mention.
const AFTER_AT: char = '\u{2060}';
/// U+200B ZERO WIDTH SPACE before a line-leading `!` or `/`, so no line we
/// post starts like a command for this or another bot.
const BEFORE_PREFIX: char = '\u{200B}';

/// Escapes the five HTML-significant characters.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Breaks mentions and line-leading command prefixes in one line.
fn neutralise(line: &str) -> String {
    let mut out = String::with_capacity(line.len() + 4);
    let trimmed = line.trim_start();
    if trimmed.starts_with(['!', '/']) {
        out.push_str(&line[..line.len() - trimmed.len()]);
        out.push(BEFORE_PREFIX);
        out.push_str(trimmed);
    } else {
        out.push_str(line);
    }
    out.replace('@', &format!("@{AFTER_AT}"))
}

/// One line of untrusted text as inert HTML (newlines become U+FFFD).
pub fn inert(text: &str) -> String {
    escape_html(&neutralise(&sanitize(text)))
}

/// Several lines of untrusted text as inert HTML lines.
fn inert_lines(text: &str) -> Vec<String> {
    text.split('\n').map(inert).collect()
}

/// Renders `reply` as Campfire message HTML, at most [`MAX_MESSAGE_BYTES`].
pub fn render(reply: &Reply) -> String {
    let mut out = String::new();
    let _ = write!(out, "<div><strong>{}</strong></div>", inert(&reply.header));
    for line in &reply.lines {
        let _ = write!(out, "<div>{}</div>", inert(line));
    }
    let budget = MAX_MESSAGE_BYTES - RESERVE;
    let mut shown = 0usize;
    'sections: for sec in &reply.sections {
        let mut part = String::new();
        if !sec.title.is_empty() {
            let _ = write!(part, "<div><strong>{}</strong></div>", inert(&sec.title));
        }
        for note in &sec.notes {
            let _ = write!(part, "<div><em>{}</em></div>", inert(note));
        }
        if out.len() + part.len() > budget {
            break 'sections;
        }
        out.push_str(&part);
        for block in &sec.blocks {
            if !block.label.is_empty() {
                let _ = write!(out, "<div>{}:</div>", inert(&block.label));
            }
            let lines = inert_lines(&block.text);
            let whole = lines.join("\n");
            if out.len() + whole.len() + 11 <= budget {
                let _ = write!(out, "<pre>{whole}</pre>");
                continue;
            }
            // Cut the block at a line boundary and say how to get the rest.
            let mut kept = 0usize;
            let mut size = out.len() + 11;
            for l in &lines {
                if size + l.len() + 1 > budget {
                    break;
                }
                size += l.len() + 1;
                kept += 1;
            }
            if kept > 0 {
                let _ = write!(out, "<pre>{}</pre>", lines[..kept].join("\n"));
            }
            let _ = write!(
                out,
                "<div><em>… {} more lines; <code>output ID HOST</code> for all</em></div>",
                lines.len() - kept
            );
            shown += 1;
            break 'sections;
        }
        shown += 1;
    }
    let rest = reply.sections.len().saturating_sub(shown);
    if rest > 0 {
        let _ = write!(
            out,
            "<div><em>… {rest} more section{} not shown (message size limit); <code>output ID HOST</code> for all</em></div>",
            if rest == 1 { "" } else { "s" }
        );
    }
    if !reply.actions.is_empty() {
        // Campfire bots have no buttons: say what to type instead.
        for a in &reply.actions {
            let _ = write!(
                out,
                "<div>{}: mention the bot with <code>{}</code></div>",
                inert(&a.label),
                inert(&a.command)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::{CodeBlock, Section};

    #[test]
    fn inert_escapes_and_neutralises() {
        for (input, expected) in [
            ("plain", "plain"),
            ("<b>&\"'", "&lt;b&gt;&amp;&quot;&#39;"),
            ("@channel hi", "@\u{2060}channel hi"),
            ("!run reboot", "\u{200B}!run reboot"),
            ("  /kick bob", "  \u{200B}/kick bob"),
            ("a\nb", "a\u{FFFD}b"),
            ("\x1b[31m", "\u{FFFD}[31m"),
        ] {
            assert_eq!(inert(input), expected, "{input:?}");
        }
    }

    #[test]
    fn long_output_is_cut_with_a_note() {
        let text: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
        let reply = Reply {
            header: "h".into(),
            sections: vec![
                Section {
                    title: "web-1".into(),
                    blocks: vec![CodeBlock {
                        label: "stdout".into(),
                        text,
                        omitted_lines: 0,
                    }],
                    ..Section::default()
                },
                Section {
                    title: "web-2".into(),
                    ..Section::default()
                },
            ],
            ..Reply::default()
        };
        let html = render(&reply);
        assert!(html.len() <= MAX_MESSAGE_BYTES, "{}", html.len());
        assert!(html.contains("more lines; <code>output ID HOST</code>"));
        assert!(html.ends_with("… 1 more section not shown (message size limit); <code>output ID HOST</code> for all</em></div>"), "{}", &html[html.len() - 200..]);
    }
}
