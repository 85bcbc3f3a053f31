//! A [`Reply`] as a Mattermost post: Markdown text with fenced code blocks,
//! buttons as message-attachment actions (ARCHITECTURE.md invariant 11: output is data).
//!
//! Mattermost's server finds mentions by splitting the text on every
//! character that is not a letter, digit or one of `: . - _ @`, after
//! removing code blocks and inline code; Markdown backslash escapes do not
//! stop a mention. So untrusted text gets a zero-width joiner after each
//! `@` that starts a word (the joiner is a separator there, so `@channel`
//! is no longer a word), everywhere, code blocks included, in case a fence
//! is ever miscounted. Outside code blocks, Markdown punctuation is
//! backslash-escaped (no links, images, emphasis, headings or tables from
//! output); inside them, runs of backticks and tildes are broken up with a
//! zero-width space so output cannot close the fence.

use serde_json::{Value, json};

use super::buttons::ButtonSigner;
use crate::adapters::Reply;
use crate::render::sanitize;

/// Mattermost's post limit (runes) since server 5.0.
pub const MAX_POST_CHARS: usize = 16383;
/// Longest button label shown.
const MAX_LABEL_CHARS: usize = 64;
/// Room kept for the truncation note and a closing fence.
const NOTE_ROOM: usize = 300;

/// Breaks a mention: a separator for Mattermost's mention parser.
pub const ZWJ: char = '\u{200D}';
/// Breaks a run of backticks or tildes inside code blocks.
pub const ZWSP: char = '\u{200B}';
/// The fence line of our code blocks; no content line can equal it.
const FENCE: &str = "```";

fn neutralise_mentions(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut prev: Option<char> = None;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '@'
            && !prev.is_some_and(char::is_alphanumeric)
            && chars
                .peek()
                .is_some_and(|n| n.is_alphanumeric() || matches!(n, '.' | '-' | '_' | ':'))
        {
            out.push(ZWJ);
        }
        prev = Some(c);
    }
    out
}

/// Untrusted text outside code blocks, on one line: control characters
/// replaced (newlines too), Markdown punctuation escaped, mentions broken.
pub fn inline(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in sanitize(s).chars() {
        if matches!(
            c,
            '\\' | '`' | '*' | '_' | '~' | '[' | ']' | '<' | '>' | '#' | '|' | '!'
        ) {
            out.push('\\');
        }
        out.push(c);
    }
    neutralise_mentions(&out)
}

/// Untrusted text inside a fenced code block: line breaks kept, control
/// characters replaced, backtick and tilde runs broken, mentions broken.
pub fn code(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for (i, line) in s.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let mut prev = None;
        for c in sanitize(line.strip_suffix('\r').unwrap_or(line)).chars() {
            if matches!(c, '`' | '~') && prev == Some(c) {
                out.push(ZWSP);
            }
            out.push(c);
            prev = Some(c);
        }
    }
    neutralise_mentions(&out)
}

/// The whole reply as Markdown (may exceed [`MAX_POST_CHARS`]; see [`fit`]).
pub fn message(reply: &Reply) -> String {
    let mut lines: Vec<String> = Vec::new();
    // An empty `****` would be a horizontal rule.
    if !reply.header.trim().is_empty() {
        lines.push(format!("**{}**", inline(reply.header.trim())));
    }
    for l in &reply.lines {
        lines.push(inline(l));
    }
    for sec in &reply.sections {
        lines.push(String::new());
        if !sec.title.trim().is_empty() {
            lines.push(format!("**{}**", inline(sec.title.trim())));
        }
        for n in &sec.notes {
            lines.push(format!("_{}_", inline(n)));
        }
        for b in &sec.blocks {
            if !b.label.is_empty() {
                lines.push(format!("{}:", inline(&b.label)));
            }
            lines.push(FENCE.to_string());
            lines.push(code(b.text.trim_end_matches('\n')));
            lines.push(FENCE.to_string());
        }
    }
    lines.join("\n")
}

/// `message` cut to Mattermost's limit at a line boundary, with fences
/// kept balanced and `note(lines_cut)` appended; unchanged if it fits.
pub fn fit(message: &str, note: impl Fn(usize) -> String) -> (String, bool) {
    if message.chars().count() <= MAX_POST_CHARS {
        return (message.to_string(), false);
    }
    let budget = MAX_POST_CHARS - NOTE_ROOM;
    let all: Vec<&str> = message.split('\n').collect();
    let mut out = String::new();
    let mut used = 0usize;
    let mut in_fence = false;
    let mut kept = 0usize;
    for line in &all {
        let n = line.chars().count() + 1;
        if used + n > budget {
            // A single huge line: keep its start rather than nothing.
            let room = budget.saturating_sub(used + 1);
            if room > 0 {
                out.extend(line.chars().take(room));
                out.push('\n');
                kept += 1;
            }
            break;
        }
        out.push_str(line);
        out.push('\n');
        used += n;
        kept += 1;
        if *line == FENCE {
            in_fence = !in_fence;
        }
    }
    if in_fence {
        out.push_str(FENCE);
        out.push('\n');
    }
    let cut = all.len() - kept;
    out.push_str(&format!("_{}_", inline(&note(cut.max(1)))));
    (out, true)
}

/// The note under a post cut at the limit whose full text follows as a file.
pub fn file_note(cut: usize) -> String {
    format!(
        "… {cut} more lines over Mattermost's {MAX_POST_CHARS}-character limit; the full reply is in the file below"
    )
}

/// The note under an edited post cut at the limit.
pub fn edit_note(cut: usize) -> String {
    format!(
        "… {cut} more lines over Mattermost's {MAX_POST_CHARS}-character limit; `output ID HOST` shows all"
    )
}

/// The reply as plain text for an uploaded file: control characters
/// replaced, nothing else changed (files are not parsed for mentions).
pub fn plain_file(reply: &Reply) -> String {
    let mut s: String = reply
        .plain()
        .split('\n')
        .map(|l| sanitize(l.strip_suffix('\r').unwrap_or(l)))
        .collect::<Vec<_>>()
        .join("\n");
    s.push('\n');
    s
}

/// `props.attachments` with one button per action, or `None`.
pub fn attachments(
    reply: &Reply,
    channel_id: &str,
    signer: &ButtonSigner,
    now: u64,
) -> Option<Value> {
    if reply.actions.is_empty() {
        return None;
    }
    let actions: Vec<Value> = reply
        .actions
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let label: String = sanitize(&a.label).chars().take(MAX_LABEL_CHARS).collect();
            json!({
                // Alphanumeric ids: Mattermost routes clicks by this id.
                "id": format!("fleetcmd{i}"),
                "type": "button",
                "name": label,
                "style": if a.danger { "danger" } else { "primary" },
                "integration": {
                    "url": signer.callback_url(),
                    "context": signer.context(channel_id, &a.command, now),
                },
            })
        })
        .collect();
    Some(json!([{ "actions": actions }]))
}

/// The `POST /api/v4/posts` body for `reply` in `channel_id` at unix time
/// `now`, and whether the text was cut (the full text then goes in a file).
pub fn post_body(
    channel_id: &str,
    reply: &Reply,
    signer: &ButtonSigner,
    now: u64,
) -> (Value, bool) {
    let (message, cut) = fit(&message(reply), file_note);
    let mut body = json!({ "channel_id": channel_id, "message": message });
    if let Some(root) = reply.thread.as_deref().filter(|t| !t.is_empty()) {
        body["root_id"] = json!(root);
    }
    if let Some(att) = attachments(reply, channel_id, signer, now) {
        body["props"] = json!({ "attachments": att });
    }
    (body, cut)
}

/// The `PUT /api/v4/posts/{id}/patch` body. `had_buttons`: the post showed
/// buttons before, so its attachments must be replaced even when empty.
pub fn patch_body(
    channel_id: &str,
    reply: &Reply,
    signer: &ButtonSigner,
    now: u64,
    had_buttons: bool,
) -> Value {
    let (message, _) = fit(&message(reply), edit_note);
    let mut body = json!({ "message": message });
    match attachments(reply, channel_id, signer, now) {
        Some(att) => body["props"] = json!({ "from_bot": "true", "attachments": att }),
        None if had_buttons => body["props"] = json!({ "from_bot": "true", "attachments": [] }),
        None => {}
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_text_is_escaped_and_mentions_broken() {
        for (input, expected) in [
            ("plain text", "plain text"),
            ("@channel", "@\u{200D}channel"),
            ("hi @here and @all.", "hi @\u{200D}here and @\u{200D}all."),
            ("x:@alice", "x:@\u{200D}alice"),
            ("root@example.com", "root@example.com"),
            ("a @ b", "a @ b"),
            ("!run x", "\\!run x"),
            ("`code` *b* _i_ ~s~", "\\`code\\` \\*b\\* \\_i\\_ \\~s\\~"),
            ("![img](http://x/y.png)", "\\!\\[img\\](http://x/y.png)"),
            ("# head | t <b>", "\\# head \\| t \\<b\\>"),
            ("two\nlines", "two\u{FFFD}lines"),
            ("back\\slash", "back\\\\slash"),
        ] {
            assert_eq!(inline(input), expected, "{input:?}");
        }
    }

    #[test]
    fn code_keeps_lines_but_cannot_close_the_fence() {
        for (input, expected) in [
            ("a\nb", "a\nb"),
            ("```", "`\u{200B}`\u{200B}`"),
            ("  ~~~ x", "  ~\u{200B}~\u{200B}~ x"),
            ("`one` ``two``", "`one` `\u{200B}`two`\u{200B}`"),
            ("@channel", "@\u{200D}channel"),
            ("crlf\r\nline", "crlf\nline"),
            ("\x1b[31m", "\u{FFFD}[31m"),
        ] {
            assert_eq!(code(input), expected, "{input:?}");
        }
    }

    #[test]
    fn message_layout() {
        let reply = Reply {
            header: " job x ok ".into(),
            lines: vec!["`uptime` on all".into()],
            sections: vec![crate::adapters::Section {
                title: "web-1".into(),
                notes: vec!["cut".into()],
                blocks: vec![crate::adapters::CodeBlock {
                    label: "stdout".into(),
                    text: "up\n".into(),
                    omitted_lines: 0,
                }],
            }],
            ..Reply::default()
        };
        assert_eq!(
            message(&reply),
            "**job x ok**\n\\`uptime\\` on all\n\n**web-1**\n_cut_\nstdout:\n```\nup\n```"
        );
        assert_eq!(message(&Reply::text("  ")), "");
    }

    #[test]
    fn fit_cuts_at_lines_and_closes_an_open_fence() {
        let long: String = (0..3000).map(|i| format!("line {i}\n")).collect();
        let msg = format!("**h**\n```\n{long}```");
        let (out, cut) = fit(&msg, edit_note);
        assert!(cut);
        assert!(out.chars().count() <= MAX_POST_CHARS);
        let fences = out.lines().filter(|l| *l == FENCE).count();
        assert_eq!(fences % 2, 0, "{out}");
        assert!(out.ends_with("shows all_"), "{out}");
        let (same, cut) = fit("short", edit_note);
        assert_eq!((same.as_str(), cut), ("short", false));
        let huge = "x".repeat(MAX_POST_CHARS * 2);
        let (out, cut) = fit(&huge, file_note);
        assert!(cut && out.chars().count() <= MAX_POST_CHARS && out.starts_with("xxx"));
    }
}
