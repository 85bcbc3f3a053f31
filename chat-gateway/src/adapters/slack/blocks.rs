//! Block Kit rendering of a [`Reply`], keeping every piece of text inert
//! (invariant 11 in ARCHITECTURE.md):
//!
//! - `&`, `<` and `>` are escaped everywhere, so `<!here>`, `<!channel>`,
//!   `<@U…>` and `<http://…|…>` in output are shown, never parsed;
//! - every mrkdwn text object is `verbatim` (Slack does not auto-link or
//!   parse bare `@channel`), and messages are posted with `parse = none`,
//!   `link_names = false` and no unfurling;
//! - output goes in ``` blocks, with any ``` inside it broken up by a
//!   zero-width space so it cannot close the block early;
//! - control and bidi characters are replaced (as on every platform).
//!
//! Slack limits a section's text to 3000 characters and a message to 50
//! blocks: long text is split over several sections, and what does not fit
//! in 50 blocks is left out with a note and uploaded as a file in the thread.

use serde_json::{Value, json};

use crate::adapters::{Reply, Section};
use crate::render::sanitize;

/// Characters of one section's text (Slack's limit is 3000).
pub const MAX_SECTION_CHARS: usize = 3000;
/// Blocks in one message (Slack's limit).
pub const MAX_BLOCKS: usize = 50;
/// Characters of a button label (Slack's limit is 75).
const MAX_BUTTON_LABEL: usize = 75;
/// Characters of a button value (Slack's limit is 2000).
pub const MAX_BUTTON_VALUE: usize = 2000;
/// Characters of the notification fallback `text`.
const MAX_FALLBACK_CHARS: usize = 3000;
/// `action_id` prefix of our buttons; clicks on anything else are ignored.
pub const ACTION_PREFIX: &str = "fleetcmd_action_";
/// `block_id` of the buttons block.
pub const ACTIONS_BLOCK: &str = "fleetcmd_actions";
/// Name of the file holding a reply that did not fit.
pub const OVERFLOW_FILE: &str = "fleetcmd-reply.txt";

const ZWSP: char = '\u{200B}';

/// A reply ready for `chat.postMessage` / `chat.update`.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    /// Notification / fallback text (the escaped header).
    pub text: String,
    pub blocks: Vec<Value>,
    /// The whole reply as plain text when blocks were left out.
    pub overflow: Option<String>,
}

/// Escapes Slack's three control characters.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

/// One line of untrusted text for mrkdwn: one line, controls replaced,
/// escaped, and never starting with a command prefix.
pub fn inline(s: &str) -> String {
    let t = escape(&sanitize(s));
    if t.starts_with(['!', '/', '.']) {
        format!("{ZWSP}{t}")
    } else {
        t
    }
}

/// Preformatted text: controls other than newline and tab replaced,
/// escaped, no run of three backticks.
pub fn code(s: &str) -> String {
    let lines: Vec<String> = s.split('\n').map(sanitize).collect();
    let escaped = escape(&lines.join("\n"));
    let mut out = String::with_capacity(escaped.len());
    let mut run = 0;
    for c in escaped.chars() {
        if c == '`' {
            run += 1;
            if run == 3 {
                out.push(ZWSP);
                run = 1;
            }
        } else {
            run = 0;
        }
        out.push(c);
    }
    out
}

fn mrkdwn(text: String) -> Value {
    json!({
        "type": "section",
        "text": { "type": "mrkdwn", "text": text, "verbatim": true }
    })
}

fn truncate_chars(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
    t.push('…');
    t
}

/// Splits `lines` (already escaped) into texts of at most `max` chars,
/// joined by newlines; a single longer line is cut into pieces.
fn chunks(lines: &[String], max: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut cur_len = 0;
    for line in lines {
        let mut rest: &str = line;
        loop {
            let len = rest.chars().count();
            let sep = usize::from(cur_len > 0);
            if cur_len + sep + len <= max {
                if sep == 1 {
                    cur.push('\n');
                }
                cur.push_str(rest);
                cur_len += sep + len;
                break;
            }
            if cur_len > 0 {
                out.push(std::mem::take(&mut cur));
                cur_len = 0;
                continue;
            }
            // A line longer than a whole chunk: cut it on a char boundary
            // (never inside an `&amp;`-style entity).
            let mut cut = rest.char_indices().nth(max).map_or(rest.len(), |(i, _)| i);
            if let Some(amp) = rest[..cut].rfind('&')
                && !rest[amp..cut].contains(';')
                && amp > 0
            {
                cut = amp;
            }
            out.push(rest[..cut].to_string());
            rest = &rest[cut..];
            if rest.is_empty() {
                break;
            }
        }
    }
    if cur_len > 0 || out.is_empty() {
        out.push(cur);
    }
    out
}

/// Content blocks of one section, each with the number of lines it shows.
fn section_blocks(sec: &Section, out: &mut Vec<(Value, usize)>) {
    let mut head = Vec::new();
    if !sec.title.is_empty() {
        head.push(format!("*{}*", inline(&sec.title)));
    }
    for n in &sec.notes {
        head.push(format!("_{}_", inline(n)));
    }
    if !head.is_empty() {
        for c in chunks(&head, MAX_SECTION_CHARS) {
            let n = c.lines().count();
            out.push((mrkdwn(c), n));
        }
    }
    for b in &sec.blocks {
        let label = if b.label.is_empty() {
            String::new()
        } else {
            format!("_{}_\n", inline(&b.label))
        };
        // "```\n" + text + "\n```" around each piece.
        let room = MAX_SECTION_CHARS - label.chars().count() - 8;
        let text = code(b.text.trim_end_matches('\n'));
        let lines: Vec<String> = text.split('\n').map(str::to_string).collect();
        for piece in chunks(&lines, room) {
            let n = piece.lines().count().max(1);
            let piece = if piece.is_empty() {
                ZWSP.to_string()
            } else {
                piece
            };
            out.push((mrkdwn(format!("{label}```\n{piece}\n```")), n));
        }
    }
}

/// Renders `reply` as Block Kit.
pub fn render(reply: &Reply) -> Rendered {
    let mut content: Vec<(Value, usize)> = Vec::new();
    let mut head = vec![format!("*{}*", inline(&reply.header))];
    head.extend(reply.lines.iter().map(|l| inline(l)));
    for c in chunks(&head, MAX_SECTION_CHARS) {
        let n = c.lines().count();
        content.push((mrkdwn(c), n));
    }
    for sec in &reply.sections {
        section_blocks(sec, &mut content);
    }

    let actions = actions_block(reply);
    let room = MAX_BLOCKS - usize::from(actions.is_some());
    let mut overflow = None;
    let mut blocks: Vec<Value>;
    if content.len() > room {
        let keep = room - 1;
        let hidden: usize = content[keep..].iter().map(|(_, n)| n).sum();
        blocks = content.into_iter().take(keep).map(|(b, _)| b).collect();
        blocks.push(json!({
            "type": "context",
            "elements": [{
                "type": "mrkdwn",
                "verbatim": true,
                "text": format!(
                    "… {hidden} more lines not shown here; the whole reply is attached in the thread as `{OVERFLOW_FILE}`"
                ),
            }]
        }));
        overflow = Some(plain(reply));
    } else {
        blocks = content.into_iter().map(|(b, _)| b).collect();
    }
    if let Some(a) = actions {
        blocks.push(a);
    }
    Rendered {
        text: truncate_chars(&inline(&reply.header), MAX_FALLBACK_CHARS),
        blocks,
        overflow,
    }
}

fn actions_block(reply: &Reply) -> Option<Value> {
    if reply.actions.is_empty() {
        return None;
    }
    let elements: Vec<Value> = reply
        .actions
        .iter()
        .take(25)
        .enumerate()
        .map(|(i, a)| {
            json!({
                "type": "button",
                "text": {
                    "type": "plain_text",
                    "text": truncate_chars(&sanitize(&a.label), MAX_BUTTON_LABEL),
                    "emoji": false,
                },
                "action_id": format!("{ACTION_PREFIX}{i}"),
                "value": truncate_chars(&a.command, MAX_BUTTON_VALUE),
                "style": if a.danger { "danger" } else { "primary" },
            })
        })
        .collect();
    Some(json!({
        "type": "actions",
        "block_id": ACTIONS_BLOCK,
        "elements": elements,
    }))
}

/// The reply as a plain-text file: output kept as it was (a file is shown
/// as text, never parsed for mentions), control characters replaced.
fn plain(reply: &Reply) -> String {
    let text = reply.plain();
    let lines: Vec<String> = text.split('\n').map(sanitize).collect();
    let mut s = lines.join("\n");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::{Action, CodeBlock};

    #[test]
    fn escaping_neutralises_mentions_links_and_prefixes() {
        for (input, expected) in [
            ("plain", "plain"),
            (
                "<!here> & <!channel>",
                "&lt;!here&gt; &amp; &lt;!channel&gt;",
            ),
            ("<@U024BE7LH>", "&lt;@U024BE7LH&gt;"),
            ("<http://evil|click>", "&lt;http://evil|click&gt;"),
            ("!run reboot on all", "\u{200B}!run reboot on all"),
            ("/fleetcmd run", "\u{200B}/fleetcmd run"),
            ("a\nb\x1b[0m", "a\u{FFFD}b\u{FFFD}[0m"),
        ] {
            assert_eq!(inline(input), expected, "{input:?}");
        }
    }

    #[test]
    fn code_never_holds_three_backticks() {
        for (input, expected) in [
            ("a ``` b", "a ``\u{200B}` b"),
            ("``````", "``\u{200B}``\u{200B}``"),
            ("`` `", "`` `"),
            ("x\n<!here>\n!run", "x\n&lt;!here&gt;\n!run"),
        ] {
            assert_eq!(code(input), expected, "{input:?}");
        }
    }

    #[test]
    fn chunks_respect_the_limit() {
        let lines: Vec<String> = (0..100).map(|i| format!("{i:>50}")).collect();
        let c = chunks(&lines, 300);
        assert!(c.iter().all(|c| c.chars().count() <= 300));
        assert_eq!(c.join("\n"), lines.join("\n"));
        let long = vec!["x".repeat(7000)];
        let c = chunks(&long, 3000);
        assert_eq!(
            c.iter().map(|c| c.len()).collect::<Vec<_>>(),
            [3000, 3000, 1000]
        );
        let ent = vec![format!("{}&amp;", "y".repeat(2998))];
        let c = chunks(&ent, 3000);
        assert_eq!(c, [("y".repeat(2998)), "&amp;".to_string()]);
    }

    #[test]
    fn long_replies_stay_within_slack_limits() {
        let reply = Reply {
            header: "output".into(),
            sections: (0..80)
                .map(|i| Section {
                    title: format!("host-{i}"),
                    blocks: vec![CodeBlock {
                        label: "stdout".into(),
                        text: "z".repeat(4000),
                        omitted_lines: 0,
                    }],
                    ..Section::default()
                })
                .collect(),
            actions: vec![Action {
                label: "Approve".into(),
                command: "approve 1".into(),
                danger: false,
            }],
            ..Reply::default()
        };
        let r = render(&reply);
        assert_eq!(r.blocks.len(), MAX_BLOCKS);
        for b in &r.blocks {
            let t = b["text"]["text"].as_str().unwrap_or_default();
            assert!(t.chars().count() <= MAX_SECTION_CHARS, "{}", t.len());
        }
        assert_eq!(r.blocks[48]["type"], "context");
        assert_eq!(r.blocks[49]["type"], "actions");
        let file = r.overflow.unwrap_or_default();
        assert!(
            file.contains("host-79") && file.len() > 80 * 4000,
            "{}",
            file.len()
        );
    }
}
