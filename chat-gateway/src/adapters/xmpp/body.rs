//! A [`Reply`] as the plain-text `<body>` of an XMPP message.
//!
//! XMPP bodies are plain text (clients render a little markdown-like
//! styling at most), so output is kept inert by layout:
//! - the header is the first line; every other line is indented, and every
//!   line of command output is prefixed with `| `, so no line (even after a
//!   client or bot trims whitespace) starts with a command prefix;
//! - a line of ours that would still start with one (`!`, `/`, `@`, `.`…)
//!   gets a `› ` guard;
//! - `@word` mentions get a word joiner after the `@` (`@\u{2060}all`), so
//!   they highlight nobody and trigger no bot;
//! - control characters (ANSI escapes, bidi overrides…) are replaced, and
//!   [`super::xml::escape_text`] makes `</body>` and friends plain text;
//! - buttons ([`crate::adapters::Action`]) become one hint line saying
//!   what to type (`→ Approve: type \`!approve ID\``);
//! - long replies are cut at [`MAX_LINES`] lines / [`MAX_CHARS`] characters
//!   with "… N more lines; `!output ID HOST` for all", N counting every
//!   line of output not shown, including those the reply had already left
//!   out ([`crate::adapters::CodeBlock::omitted_lines`]); an `output` reply
//!   points to `fleetcmd job output ID` instead of repeating itself.

use crate::adapters::Reply;
use crate::render::sanitize;

/// Lines in one message body.
pub const MAX_LINES: usize = 60;
/// Characters in one message body.
pub const MAX_CHARS: usize = 8000;
/// Characters in one line; longer lines end in `…`.
pub const MAX_LINE_CHARS: usize = 2000;
/// Prefix of every line of command output.
pub const OUTPUT_PREFIX: &str = "    | ";

/// Characters that start a command for common chat bots.
const COMMAND_STARTS: &[char] = &[
    '!', '/', '.', '@', '$', '?', '>', '#', '%', '&', '*', '+', '-', ',', ';', ':', '~', '\\', '^',
    '=',
];

/// Neutralises `@mentions` and control characters in one line.
fn inert(s: &str) -> String {
    let mut clean = sanitize(s).replace('\t', "    ");
    if let Some((cut, _)) = clean.char_indices().nth(MAX_LINE_CHARS) {
        clean.truncate(cut);
        clean.push('…');
    }
    let mut out = String::with_capacity(clean.len());
    let mut prev: Option<char> = None;
    let mut chars = clean.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '@'
            && prev.is_none_or(|p| !p.is_alphanumeric())
            && chars.peek().is_some_and(|n| n.is_alphanumeric())
        {
            out.push('\u{2060}');
        }
        prev = Some(c);
    }
    out
}

/// A line of ours (not output): inert, and guarded if it would start with
/// a command character once trimmed.
fn guarded(s: &str) -> String {
    let line = inert(s);
    let t = line.trim_start();
    if t.starts_with(COMMAND_STARTS) {
        format!("› {t}")
    } else {
        line
    }
}

/// The job id named in a header (`job 0190ab12-…`), for the truncation hint.
fn job_id(header: &str) -> Option<&str> {
    let mut words = header.split_whitespace();
    while let Some(w) = words.next() {
        if w == "job"
            && let Some(id) = words.next()
            && id.len() >= 8
            && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        {
            return Some(id);
        }
    }
    None
}

/// The agent a section is about (its title's first word), when it looks
/// like an agent id.
fn host_of(title: &str) -> Option<&str> {
    let w = title.split_whitespace().next()?;
    fleetcmd_core::ids::AgentId::parse(w).ok().map(|_| w)
}

/// One line of the body, or a count of output lines the reply already
/// left out (shown as `… N more lines`; counted again if the body is cut
/// before it).
enum Line {
    Text(String),
    Omitted(usize),
}

impl Line {
    /// How many lines of the whole output this entry stands for.
    fn weight(&self) -> usize {
        match self {
            Line::Text(_) => 1,
            Line::Omitted(n) => *n,
        }
    }

    fn text(&self) -> String {
        match self {
            Line::Text(t) => t.clone(),
            Line::Omitted(n) => format!("    … {}", more_lines(*n)),
        }
    }
}

fn more_lines(n: usize) -> String {
    format!("{n} more line{}", if n == 1 { "" } else { "s" })
}

/// Where the rest of a cut reply is: after a job's result, `!output ID
/// HOST` (the job's short id, the host the cut fell in); after an `output`
/// reply — the very command just typed — the CLI, which has all of it.
fn hint(header: &str, host: Option<&str>) -> String {
    let Some(id) = job_id(header) else {
        return String::new();
    };
    if header.starts_with("output of job ") {
        return format!("; not shown in chat; `fleetcmd job output {id}` has all");
    }
    match host {
        Some(host) => format!("; `!output {id} {host}` for all"),
        None => format!("; `!output {id}` for all"),
    }
}

/// Renders `reply` as body text (no trailing newline).
pub fn render(reply: &Reply) -> String {
    // (line, host of the section it belongs to)
    let mut lines: Vec<(Line, Option<&str>)> = Vec::new();
    lines.push((Line::Text(guarded(&reply.header)), None));
    for l in &reply.lines {
        for part in l.split('\n') {
            lines.push((Line::Text(format!("  {}", guarded(part))), None));
        }
    }
    for sec in &reply.sections {
        let host = host_of(&sec.title);
        if !sec.title.is_empty() {
            lines.push((Line::Text(format!("  {}", guarded(&sec.title))), host));
        }
        for note in &sec.notes {
            lines.push((Line::Text(format!("    ({})", inert(note))), host));
        }
        for block in &sec.blocks {
            if !block.label.is_empty() {
                lines.push((Line::Text(format!("    {}:", guarded(&block.label))), host));
            }
            for line in block.text.trim_end_matches('\n').split('\n') {
                lines.push((Line::Text(format!("{OUTPUT_PREFIX}{}", inert(line))), host));
            }
            if block.omitted_lines > 0 {
                lines.push((Line::Omitted(block.omitted_lines), host));
            }
        }
    }
    if !reply.actions.is_empty() {
        let hints: Vec<String> = reply
            .actions
            .iter()
            .map(|a| format!("{}: type `!{}`", inert(&a.label), inert(&a.command)))
            .collect();
        lines.push((Line::Text(format!("  → {}", hints.join(" · "))), None));
    }

    let total = lines.len();
    let mut out = String::new();
    let mut chars = 0usize;
    for (i, (line, _)) in lines.iter().enumerate() {
        let text = line.text();
        let n = text.chars().count() + 1;
        // Keep room for the truncation note itself.
        if (i >= MAX_LINES - 1 && total > MAX_LINES) || chars + n > MAX_CHARS - 100 {
            let rest: usize = lines[i..].iter().map(|(l, _)| l.weight()).sum();
            if i > 0 {
                out.push('\n');
            }
            out.push_str(&format!(
                "  … {}{}",
                more_lines(rest),
                hint(&reply.header, lines[i].1)
            ));
            return out;
        }
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&text);
        chars += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::{CodeBlock, Section};

    #[test]
    fn lines_never_start_like_a_command() {
        let reply = Reply {
            header: "!run reboot on all".into(),
            lines: vec!["/me waves".into(), "@all look\nsecond".into()],
            sections: vec![Section {
                title: "web-1 — ok".into(),
                notes: vec![],
                blocks: vec![CodeBlock {
                    label: "stdout".into(),
                    text: "!run x\n\t@here mail me@host".into(),
                    omitted_lines: 0,
                }],
            }],
            ..Reply::default()
        };
        let body = render(&reply);
        assert_eq!(
            body,
            "› !run reboot on all\n  › /me waves\n  › @\u{2060}all look\n  second\n  web-1 — ok\n    stdout:\n    | !run x\n    |     @\u{2060}here mail me@host"
        );
        for line in body.lines() {
            let t = line.trim_start();
            assert!(!t.starts_with(['!', '/', '@']), "{line:?}");
        }
    }

    #[test]
    fn long_output_is_cut_with_a_hint_naming_job_and_host() {
        let text: Vec<String> = (0..200).map(|i| format!("line {i}")).collect();
        let reply = Reply {
            header: "job 0190ab12-34cd-7ef0 succeeded (1/1 ok) — asked by xmpp:a@b".into(),
            sections: vec![Section {
                title: "web-2".into(),
                blocks: vec![CodeBlock {
                    label: "stdout".into(),
                    text: text.join("\n"),
                    omitted_lines: 0,
                }],
                ..Section::default()
            }],
            ..Reply::default()
        };
        let body = render(&reply);
        assert_eq!(body.lines().count(), MAX_LINES);
        let last = body.lines().last().unwrap_or_default();
        assert_eq!(
            last,
            "  … 144 more lines; `!output 0190ab12-34cd-7ef0 web-2` for all"
        );
        let long = Reply {
            header: "h".repeat(MAX_CHARS),
            lines: vec!["y".repeat(MAX_LINE_CHARS); 10],
            ..Reply::default()
        };
        let body = render(&long);
        assert!(body.chars().count() < MAX_CHARS, "{}", body.len());
        assert!(body.starts_with(&format!("{}…\n", "h".repeat(MAX_LINE_CHARS))));
        assert!(
            body.ends_with("  … 8 more lines"),
            "{}",
            &body[body.len() - 40..]
        );
    }
    /// A finished job whose hosts each printed `lines` lines.
    fn job_with_output(hosts: &[&str], lines: usize) -> fleetcmd_proto::v1::Job {
        use fleetcmd_proto::v1;
        let stdout: String = (1..=lines).map(|i| format!("line {i}\n")).collect();
        v1::Job {
            job_id: "01890a5d-ac96-774b-bcce-b302099a8057".into(),
            command: "logs".into(),
            selector: "all".into(),
            requester: "xmpp:a@b".into(),
            state: "succeeded".into(),
            targets: hosts
                .iter()
                .map(|h| v1::Target {
                    agent_id: h.to_string(),
                    state: "ok".into(),
                    result: Some(v1::JobResult {
                        exit_code: Some(0),
                        stdout: stdout.clone().into_bytes(),
                        ..v1::JobResult::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ..v1::Job::default()
        }
    }

    fn shown_output(body: &str) -> usize {
        body.lines()
            .filter(|l| l.starts_with(OUTPUT_PREFIX))
            .count()
    }

    #[test]
    fn the_more_lines_count_includes_what_the_reply_had_left_out() {
        // Two hosts of 520 lines: the job reply carries 30 of each; the
        // body shows all of web-1's 30 and part of web-2's.
        let job = job_with_output(&["web-1", "web-2"], 520);
        let body = render(&crate::render::job(&job));
        assert!(body.contains("\n    … 490 more lines\n"), "{body}");
        // web-1's 490 are counted by its own line; the cut falls in web-2,
        // whose unshown lines are its 490 and the rest of its 30.
        let last = body.lines().last().unwrap_or_default();
        let missing = 520 - (shown_output(&body) - 30);
        assert_eq!(
            last,
            format!("  … {missing} more lines; `!output b302099a8057 web-2` for all"),
            "{body}"
        );
        assert!(missing > 490, "{missing}");
    }

    #[test]
    fn an_output_reply_cut_points_to_the_cli_not_to_itself() {
        let job = job_with_output(&["web-1"], 520);
        let body = render(&crate::render::output_for(&job, Some("web-1"), "xmpp:a@b"));
        let last = body.lines().last().unwrap_or_default();
        assert_eq!(
            last,
            format!(
                "  … {} more lines; not shown in chat; `fleetcmd job output b302099a8057` has all",
                520 - shown_output(&body)
            )
        );
        assert!(!last.contains("`!output"), "{last}");
    }
}
