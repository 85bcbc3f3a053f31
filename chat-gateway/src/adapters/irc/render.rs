//! How a [`Reply`] looks on IRC: a few compact lines, every one inert.
//!
//! ```text
//! job b302099a8057 failed (1/2 ok) — asked by irc:net:alice!~alice@host
//! · `uptime` on all
//! » web-1 — ok, exit 0, 12 ms
//!   | up 3 days
//! » web-2 — failed, exit 2, 1.5 s
//!   (stderr truncated in chat; …)
//!   [stderr]
//!   | boom
//!   | … 12 more lines; `output b302099a8057 web-2` for all
//! → approve with: !approve b302099a8057 · deny with: !deny b302099a8057
//! ```
//!
//! Every line but the header starts with one of our markers (`·`, `»`,
//! `(`, `[`, `|`, `→`), so no line — even with leading spaces trimmed, as
//! bots do — can start with `!`, a bot's name and `:`, or anything else a
//! bot reacts to; the header gets a `·` too when its start is not plain.
//! Untrusted text loses IRC formatting and control characters (CTCP
//! `\x01`, colours `\x03`, bold…, CR and LF) so it cannot end the line,
//! inject a command, or pretend to be an ACTION.

use crate::adapters::{Reply, Section};

/// Prefix of every line of command output.
pub const OUTPUT_PREFIX: &str = "  | ";
/// Prefix of the continuation of a line too long for one IRC message.
pub const CONTINUATION_PREFIX: &str = "  … ";

/// Limits on what one reply shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RenderLimits {
    /// Output lines shown per section of a job result.
    pub max_output_lines: usize,
    /// Output lines shown per section of an `output ID [HOST]` reply.
    pub max_full_output_lines: usize,
    /// Lines of one reply (before the action hint); the rest is counted.
    pub max_reply_lines: usize,
}

/// Removes IRC formatting and control characters (C0 incl. `\x01` CTCP,
/// `\x02` bold, `\x03` colour, `\x0f`, `\x16`, `\x1d`, `\x1f`…, DEL, C1, and
/// bidi overrides); tabs, CR and LF become spaces so words stay apart.
pub fn clean(s: &str) -> String {
    s.chars()
        .filter_map(|c| match c {
            '\t' | '\r' | '\n' => Some(' '),
            c if fleetcmd_core::terminal::is_unsafe(c) => None,
            c => Some(c),
        })
        .collect()
}

/// `line` if it cannot address a bot, else `line` with `· ` in front: it
/// must start with a letter or digit and its first word must not end with
/// `:` or `,` (`somebot: do x`), or start with one of our markers.
pub fn inert(line: String) -> String {
    let t = line.trim_start();
    let Some(first) = t.chars().next() else {
        return line;
    };
    let safe = if first.is_alphanumeric() {
        let word = t.split(' ').next().unwrap_or(t);
        !word.ends_with([':', ','])
    } else {
        matches!(first, '·' | '»' | '(' | '[' | '|' | '→' | '…')
    };
    if safe {
        line
    } else {
        let indent = &line[..line.len() - t.len()];
        format!("{indent}· {t}")
    }
}

/// The job id in a header of the form `job <id> …` or `output of job <id> …`.
fn job_id(header: &str) -> Option<&str> {
    let rest = header
        .strip_prefix("output of job ")
        .or_else(|| header.strip_prefix("job "))?;
    let id = rest.split(' ').next()?;
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')).then_some(id)
}

/// The host a section is about: its title up to ` — `.
fn host(sec: &Section) -> Option<&str> {
    let h = sec.title.split(" — ").next()?.trim();
    (!h.is_empty() && !h.contains(char::is_whitespace) && !h.contains('`')).then_some(h)
}

/// Bytes up to which a one-host result is folded onto one line (a PRIVMSG
/// text has room for about 400 after the prefix; longer stays multi-line).
pub const COMPACT_MAX_BYTES: usize = 360;

/// Whether a note only says that the gateway cut this output for chat
/// (the section then holds fewer lines than the host printed).
fn cut_for_chat(note: &str) -> bool {
    note.contains("truncated in chat")
}

/// A result for one host folded onto one or two lines: header, summary
/// lines and host title on the first, and its one output line after a
/// ` | ` on the same line when it fits (else on a second line). `None`
/// when the reply is anything else (several hosts, notes, actions, more
/// than one line of output), which keeps the long form.
fn compact(reply: &Reply) -> Option<Vec<String>> {
    let [sec] = reply.sections.as_slice() else {
        return None;
    };
    if !reply.actions.is_empty() || !sec.notes.is_empty() || sec.title.trim().is_empty() {
        return None;
    }
    let mut output: Vec<String> = Vec::new();
    for block in &sec.blocks {
        if block.label != "stdout" && !block.label.trim().is_empty() {
            return None;
        }
        output.extend(
            block
                .text
                .trim_end_matches('\n')
                .split('\n')
                .map(clean)
                .filter(|l| !l.trim().is_empty()),
        );
    }
    if output.len() > 1 {
        return None;
    }
    let mut first = inert(clean(&reply.header));
    for line in &reply.lines {
        let line = clean(line);
        if !line.trim().is_empty() {
            first.push_str(&format!(" · {line}"));
        }
    }
    first.push_str(&format!(" » {}", clean(&sec.title)));
    let mut out = vec![first];
    if let Some(line) = output.pop() {
        let joined = format!("{} | {}", out[0], line.trim_end());
        if joined.len() <= COMPACT_MAX_BYTES {
            out[0] = joined;
        } else {
            out.push(format!("{OUTPUT_PREFIX}{line}"));
        }
    }
    for line in &mut out {
        line.truncate(line.trim_end().len());
    }
    (out[0].len() <= COMPACT_MAX_BYTES).then_some(out)
}

/// The reply as IRC message texts, in order (not yet split to the line
/// limit: the connection does that, knowing its own prefix length).
/// A one-host result with at most one output line is one or two lines
/// ([`compact`]): on IRC every line costs a token of the flood control.
pub fn render(reply: &Reply, limits: RenderLimits) -> Vec<String> {
    if let Some(out) = compact(reply) {
        return out;
    }
    let full_output = reply.header.starts_with("output of job ");
    let id = job_id(&reply.header).map(clean);
    let per_section = if full_output {
        limits.max_full_output_lines
    } else {
        limits.max_output_lines
    };
    let mut out = vec![inert(clean(&reply.header))];
    for line in &reply.lines {
        let line = clean(line);
        if !line.trim().is_empty() {
            out.push(format!("· {line}"));
        }
    }
    for sec in &reply.sections {
        if !sec.title.trim().is_empty() {
            out.push(format!("» {}", clean(&sec.title)));
        }
        // The gateway already cut this output for chat: our count is only
        // of what it kept, so the hint says "at least" and points to the
        // full output itself (the gateway's own note would repeat it).
        let cut_upstream = sec.notes.iter().any(|n| cut_for_chat(n));
        for note in sec.notes.iter().filter(|n| !cut_for_chat(n)) {
            out.push(format!("  ({})", clean(note)));
        }
        let mut shown = 0usize;
        let mut hidden = 0usize;
        for block in &sec.blocks {
            let lines: Vec<&str> = block.text.trim_end_matches('\n').split('\n').collect();
            if shown >= per_section {
                hidden += lines.len();
                continue;
            }
            // stdout is the usual case and goes unlabelled, to stay compact.
            if !block.label.trim().is_empty() && block.label != "stdout" {
                out.push(format!("  [{}]", clean(&block.label)));
            }
            for line in lines {
                if shown < per_section {
                    out.push(format!("{OUTPUT_PREFIX}{}", clean(line)));
                    shown += 1;
                } else {
                    hidden += 1;
                }
            }
        }
        // Lines the gateway left out before us, when it counted them: the
        // count is exact again.
        let upstream: usize = sec.blocks.iter().map(|b| b.omitted_lines).sum();
        hidden += upstream;
        let cut_upstream = cut_upstream && upstream == 0;
        if hidden > 0 || cut_upstream {
            let s = if hidden == 1 && !cut_upstream {
                ""
            } else {
                "s"
            };
            let count = match (hidden, cut_upstream) {
                (0, _) => "".to_string(),
                (n, true) => format!("at least {n} "),
                (n, false) => format!("{n} "),
            };
            let hint = match (&id, host(sec), full_output) {
                (Some(id), _, true) => {
                    format!("not shown on IRC; `fleetcmd job output {id}` has all")
                }
                (Some(id), Some(h), false) => format!("`output {id} {}` for all", clean(h)),
                (Some(id), None, false) => format!("`output {id}` for all"),
                (None, _, _) => "not shown on IRC".to_string(),
            };
            out.push(format!("{OUTPUT_PREFIX}… {count}more line{s}; {hint}"));
        }
    }
    let max = limits.max_reply_lines.max(2);
    if out.len() > max {
        let hidden = out.len() - (max - 1);
        out.truncate(max - 1);
        let hint = match &id {
            Some(id) if full_output => format!("`fleetcmd job output {id}` has all"),
            Some(id) => format!("`job {id}` and `output {id} HOST` show more"),
            None => "not shown on IRC".to_string(),
        };
        out.push(format!("· … {hidden} more lines; {hint}"));
    }
    if !reply.actions.is_empty() {
        let hints: Vec<String> = reply
            .actions
            .iter()
            .map(|a| format!("{} with: !{}", clean(&a.label), clean(&a.command)))
            .collect();
        out.push(format!("→ {}", hints.join(" · ")));
    }
    // Servers drop trailing spaces; dropping them here keeps what we send
    // what arrives.
    for line in &mut out {
        line.truncate(line.trim_end().len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_strips_formatting_and_line_breaks() {
        for (input, expected) in [
            ("plain ünïcode", "plain ünïcode"),
            ("\x01ACTION waves\x01", "ACTION waves"),
            (
                "\x0304red\x03 \x02bold\x02 \x1ditalic\x1d\x0f",
                "04red bold italic",
            ),
            ("foo\r\nQUIT :bye", "foo  QUIT :bye"),
            ("a\tb\0c\x7fd\u{85}e", "a bcde"),
            ("rtl\u{202E}txt", "rtltxt"),
        ] {
            assert_eq!(clean(input), expected, "{input:?}");
        }
    }

    #[test]
    fn inert_guards_line_starts() {
        for (input, expected) in [
            ("job 1 ok", "job 1 ok"),
            ("!run reboot on all", "· !run reboot on all"),
            ("  !run x", "  · !run x"),
            ("@channel hi", "· @channel hi"),
            ("fleetcmd: run x", "· fleetcmd: run x"),
            ("otherbot, deploy", "· otherbot, deploy"),
            (".deploy", "· .deploy"),
            ("» title", "» title"),
            ("", ""),
        ] {
            assert_eq!(inert(input.to_string()), expected, "{input:?}");
        }
    }

    fn limits(per_section: usize, full: usize, reply: usize) -> RenderLimits {
        RenderLimits {
            max_output_lines: per_section,
            max_full_output_lines: full,
            max_reply_lines: reply,
        }
    }

    fn section(title: &str, lines: usize) -> Section {
        Section {
            title: title.into(),
            notes: vec![],
            blocks: vec![crate::adapters::CodeBlock {
                label: "stdout".into(),
                text: (1..=lines).map(|i| format!("l{i}\n")).collect(),
                omitted_lines: 0,
            }],
        }
    }

    #[test]
    fn long_replies_are_cut_but_keep_their_actions() {
        let reply = Reply {
            header: "job 0189-ab failed (0/9 ok) — asked by x".into(),
            sections: (1..=9)
                .map(|i| section(&format!("h{i} — failed"), 3))
                .collect(),
            actions: vec![crate::adapters::Action {
                label: "cancel".into(),
                command: "cancel 0189-ab".into(),
                danger: true,
            }],
            ..Reply::default()
        };
        let out = render(&reply, limits(2, 5, 6));
        assert_eq!(
            out,
            [
                "job 0189-ab failed (0/9 ok) — asked by x",
                "» h1 — failed",
                "  | l1",
                "  | l2",
                "  | … 1 more line; `output 0189-ab h1` for all",
                "· … 32 more lines; `job 0189-ab` and `output 0189-ab HOST` show more",
                "→ cancel with: !cancel 0189-ab",
            ]
        );
    }

    #[test]
    fn output_replies_show_more_and_point_to_the_cli() {
        let reply = Reply {
            header: "output of job 0189-ab `uptime` on h1 — asked by x".into(),
            sections: vec![section("h1", 8)],
            ..Reply::default()
        };
        let out = render(&reply, limits(2, 5, 40));
        assert_eq!(out.len(), 1 + 1 + 5 + 1, "{out:#?}");
        assert_eq!(
            out[7],
            "  | … 3 more lines; not shown on IRC; `fleetcmd job output 0189-ab` has all"
        );
    }

    #[test]
    fn a_short_one_host_result_is_one_line() {
        let reply = Reply {
            header: "job 0189-ab ok (1/1 ok) — asked by irc:n:alice!a@h".into(),
            lines: vec!["`uptime` on all".into()],
            sections: vec![Section {
                title: "web-1 — ok, exit 0, 12 ms".into(),
                notes: vec![],
                blocks: vec![crate::adapters::CodeBlock {
                    label: "stdout".into(),
                    text: " 10:00:00 up 3 days\n".into(),
                    omitted_lines: 0,
                }],
            }],
            ..Reply::default()
        };
        assert_eq!(
            render(&reply, limits(10, 50, 40)),
            [
                "job 0189-ab ok (1/1 ok) — asked by irc:n:alice!a@h · `uptime` on all » web-1 — ok, exit 0, 12 ms |  10:00:00 up 3 days"
            ]
        );
        // No output: still one line.
        let mut quiet = reply.clone();
        quiet.sections[0].blocks.clear();
        assert_eq!(render(&quiet, limits(10, 50, 40)).len(), 1);
        // A long output line goes on a second line instead.
        let mut long = reply.clone();
        long.sections[0].blocks[0].text = "x".repeat(COMPACT_MAX_BYTES);
        let out = render(&long, limits(10, 50, 40));
        assert_eq!(out.len(), 2, "{out:#?}");
        assert!(out[0].ends_with("» web-1 — ok, exit 0, 12 ms"), "{out:#?}");
        assert_eq!(
            out[1],
            format!("{OUTPUT_PREFIX}{}", "x".repeat(COMPACT_MAX_BYTES))
        );
        // Two output lines, two hosts, or a note keep the long form.
        let mut two = reply.clone();
        two.sections[0].blocks[0].text = "a\nb".into();
        assert_eq!(render(&two, limits(10, 50, 40)).len(), 5);
        let mut hosts = reply.clone();
        hosts.sections.push(section("web-2 — ok", 1));
        assert_eq!(render(&hosts, limits(10, 50, 40)).len(), 6);
        let mut noted = reply;
        noted.sections[0]
            .notes
            .push("the agent dropped 5 bytes".into());
        assert_eq!(render(&noted, limits(10, 50, 40)).len(), 5);
    }

    /// A one-host result of `lines` output lines that the gateway noted
    /// it had cut for chat.
    fn cut_for_chat_reply(lines: usize) -> Reply {
        let mut sec = section("web-1 — ok, exit 0, 1 ms", lines);
        sec.notes
            .push("stdout truncated in chat; full output: `output 0189-ab web-1`".into());
        Reply {
            header: "job 0189-ab ok (1/1 ok) — asked by x".into(),
            sections: vec![sec],
            ..Reply::default()
        }
    }

    #[test]
    fn the_count_of_hidden_lines_is_never_too_small() {
        // The gateway kept 30 of the host's 500 lines (and said so in a
        // note); IRC shows 10: 20 is what we know is missing, not all.
        let out = render(&cut_for_chat_reply(30), limits(10, 50, 40));
        assert_eq!(out.len(), 1 + 1 + 10 + 1, "{out:#?}");
        assert_eq!(
            out[12],
            "  | … at least 20 more lines; `output 0189-ab web-1` for all"
        );
        // When the gateway counted what it left out (470 of 500), the count
        // is exact: 20 here plus 470 there.
        let mut counted = cut_for_chat_reply(30);
        counted.sections[0].blocks[0].omitted_lines = 470;
        let out = render(&counted, limits(10, 50, 40));
        assert_eq!(
            out[12],
            "  | … 490 more lines; `output 0189-ab web-1` for all"
        );
        // Cut for length only (nothing hidden here): still says there is more.
        let out = render(&cut_for_chat_reply(2), limits(10, 50, 40));
        assert_eq!(
            out.last().map(String::as_str),
            Some("  | … more lines; `output 0189-ab web-1` for all"),
            "{out:#?}"
        );
    }

    #[test]
    fn ids_and_hosts() {
        assert_eq!(job_id("job 0189-ab failed"), Some("0189-ab"));
        assert_eq!(job_id("output of job 0189 `x`"), Some("0189"));
        assert_eq!(job_id("job `x` on all"), None);
        assert_eq!(job_id("you are x"), None);
        let sec = |t: &str| Section {
            title: t.into(),
            ..Section::default()
        };
        assert_eq!(host(&sec("web-1 — ok, exit 0")), Some("web-1"));
        assert_eq!(host(&sec("web-1")), Some("web-1"));
        assert_eq!(host(&sec("a b — c")), None);
    }
}
