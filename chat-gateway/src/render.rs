//! Building replies from controller data, and the text rules every adapter
//! applies so output stays data (invariant 11 in ARCHITECTURE.md).
//!
//! This module decides *what* a reply says; adapters decide how it looks on
//! their platform and escape it there.

use std::fmt::Write as _;

use crate::registry::CommandSpec;
use fleetcmd_core::grammar;
use fleetcmd_core::ids::short_form;
use fleetcmd_core::policy::{ArgKind, CommandDef};
use fleetcmd_core::terminal::excerpt;
use fleetcmd_core::when;
use fleetcmd_proto::v1;

use crate::adapters::{Action, CodeBlock, Reply, Section};

/// Characters of one output stream shown in chat.
pub const MAX_OUTPUT_CHARS: usize = 1500;
/// Lines of one output stream shown in chat.
pub const MAX_OUTPUT_LINES: usize = 30;
/// Hosts shown with a section in one job reply; the rest are counted.
pub const MAX_HOST_SECTIONS: usize = 25;

/// Job states after which nothing changes any more.
pub const TERMINAL_STATES: [&str; 6] = [
    "succeeded",
    "failed",
    "aborted",
    "canceled",
    "expired",
    "denied",
];

/// Whether a job state is final.
pub fn is_terminal(state: &str) -> bool {
    TERMINAL_STATES.contains(&state)
}

/// Replaces control characters other than tab (ANSI escapes, carriage
/// returns, bells, newlines) and invisible or bidi formatting characters
/// (the set of `fleetcmd_core::terminal::is_unsafe`, which the CLI escapes
/// too) with U+FFFD, so text cannot rewrite the terminal or what a reader
/// sees.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c == '\n' || fleetcmd_core::terminal::is_unsafe(c) {
                '\u{FFFD}'
            } else {
                c
            }
        })
        .collect()
}

/// `" — asked by <who>"`, appended to headers so every reply names who asked.
pub fn asked_by(who: &str) -> String {
    format!(" — asked by {who}")
}

/// One line describing a command's positional arguments, e.g.
/// `restart <unit: enum nginx.service|app.service>`.
pub fn usage(def: &CommandDef) -> String {
    let mut s = def.name.clone();
    for name in def.positional() {
        let Some(spec) = def.args.get(name) else {
            continue;
        };
        let kind = match &spec.kind {
            ArgKind::Enum { values } => format!("enum {}", values.join("|")),
            ArgKind::Int { min, max } => match (*min == i64::MIN, *max == i64::MAX) {
                (true, true) => "int".to_string(),
                _ => format!("int {min}..={max}"),
            },
            ArgKind::Pattern { source, .. } => format!("pattern {source}"),
            other => other.name().to_string(),
        };
        match &spec.default {
            Some(d) => {
                let _ = write!(s, " [{name}: {kind}, default {d}]");
            }
            None => {
                let _ = write!(s, " <{name}: {kind}>");
            }
        }
    }
    s
}

/// `help VERB`: the verb's usage, what it does and its options; when a
/// command the asker may run has the same name, its usage too.
fn verb_help(who: &str, verb: &grammar::VerbHelp, def: Option<&CommandDef>) -> Reply {
    let mut lines = vec![format!("usage: {}", verb.usage), verb.about.to_string()];
    lines.extend(verb.details.iter().map(|d| d.to_string()));
    if let Some(def) = def {
        lines.push(format!(
            "also a command here: run {} on <selector>",
            usage(def)
        ));
    }
    Reply {
        header: format!("help for `{}`{}", verb.verb, asked_by(who)),
        lines,
        ..Reply::default()
    }
}

/// `help VERB` for a verb an integration or plugin registered.
fn registered_help(who: &str, spec: &CommandSpec, def: Option<&CommandDef>) -> Reply {
    let mut lines = vec![format!("usage: {}", spec.usage)];
    lines.extend(
        [spec.summary.as_str(), spec.help.as_str()]
            .into_iter()
            .flat_map(str::lines)
            .filter(|l| !l.is_empty())
            .map(str::to_string),
    );
    if let Some(def) = def {
        lines.push(format!(
            "also a command here: run {} on <selector>",
            usage(def)
        ));
    }
    Reply {
        header: format!("help for `{}`{}", spec.verb, asked_by(who)),
        lines,
        ..Reply::default()
    }
}

/// `help`, `help VERB` and `help CMD` for the commands the asker may run
/// here; `registered` are the verbs integrations added that the asker's
/// guard admits here.
pub fn help(
    who: &str,
    commands: &[&CommandDef],
    registered: &[&CommandSpec],
    topic: Option<&str>,
) -> Reply {
    if let Some(topic) = topic {
        let def = commands.iter().find(|c| c.name == topic);
        if let Some(verb) = grammar::verb_help(topic) {
            return verb_help(who, verb, def.copied());
        }
        if let Some(spec) = registered
            .iter()
            .find(|s| s.verb.eq_ignore_ascii_case(topic))
        {
            return registered_help(who, spec, def.copied());
        }
        return match def {
            Some(def) => {
                let mut lines = vec![format!("usage: run {} on <selector>", usage(def))];
                if !def.description.is_empty() {
                    lines.push(def.description.clone());
                }
                lines.push(format!("timeout {}s", def.timeout.as_secs()));
                if let Some(t) = &def.targets {
                    lines.push(format!("only on `{t}`"));
                }
                if def.requires_approvals > 0 {
                    lines.push(format!("needs {} approval(s)", def.requires_approvals));
                }
                Reply {
                    header: format!("help for `{}`{}", def.name, asked_by(who)),
                    lines,
                    ..Reply::default()
                }
            }
            None => Reply::text(format!(
                "`{}` is not a command you may run in this channel; try `help`{}",
                excerpt(topic),
                asked_by(who)
            )),
        };
    }
    if commands.is_empty() && registered.is_empty() {
        return Reply::text(format!(
            "you may not run any command in this channel{}",
            asked_by(who)
        ));
    }
    let (run, others): (Vec<&grammar::VerbHelp>, Vec<_>) =
        grammar::VERBS.iter().partition(|v| v.verb == "run");
    let mut lines: Vec<String> = run.iter().map(|v| v.usage.to_string()).collect();
    lines.push(format!(
        "also: {}; `help VERB` for any of them",
        others
            .iter()
            .map(|v| v.usage)
            .chain(registered.iter().map(|s| s.usage.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    for def in commands {
        let mut line = format!("• {}", usage(def));
        if !def.description.is_empty() {
            let _ = write!(line, " — {}", def.description);
        }
        lines.push(line);
    }
    Reply {
        header: format!("commands you may run here{}", asked_by(who)),
        lines,
        ..Reply::default()
    }
}

/// At most [`MAX_OUTPUT_LINES`] lines and [`MAX_OUTPUT_CHARS`] characters of
/// `bytes` (lossy UTF-8), and whether anything was cut.
pub fn truncate_output(bytes: &[u8]) -> (String, bool) {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim_end_matches('\n');
    let mut out = String::new();
    let mut cut = false;
    for (i, line) in text.split('\n').enumerate() {
        if i >= MAX_OUTPUT_LINES {
            cut = true;
            break;
        }
        let room = MAX_OUTPUT_CHARS.saturating_sub(out.chars().count());
        if line.chars().count() + 1 > room {
            if i > 0 {
                out.push('\n');
            }
            out.extend(line.chars().take(room.saturating_sub(1)));
            cut = true;
            break;
        }
        if i > 0 {
            out.push('\n');
        }
        out.push_str(line);
    }
    (out, cut)
}

/// Lines in command output as a reply shows them: trailing newlines are
/// dropped, as [`truncate_output`] drops them.
fn lines_in(bytes: &[u8]) -> usize {
    let end = bytes.iter().rposition(|b| *b != b'\n').map_or(0, |i| i + 1);
    let text = &bytes[..end];
    if text.is_empty() {
        0
    } else {
        text.iter().filter(|b| **b == b'\n').count() + 1
    }
}

/// `exit 1, 2.5 s`: how a host's run ended and how long it took.
pub fn outcome_detail(r: &v1::JobResult) -> String {
    let mut parts = Vec::new();
    if let Some(code) = r.exit_code {
        parts.push(format!("exit {code}"));
    }
    if let Some(sig) = r.signal {
        parts.push(format!("signal {sig}"));
    }
    match (r.reason_code.is_empty(), r.reason.is_empty()) {
        (true, true) => {}
        (false, true) => parts.push(r.reason_code.clone()),
        (true, false) => parts.push(r.reason.clone()),
        (false, false) => parts.push(format!("{}: {}", r.reason_code, r.reason)),
    }
    parts.push(when::elapsed(r.duration_ms));
    parts.join(", ")
}

/// One host's section of a job reply.
pub fn target_section(job_id: &str, t: &v1::Target) -> Section {
    let mut sec = Section {
        title: format!("{} — {}", t.agent_id, t.state),
        ..Section::default()
    };
    let Some(r) = &t.result else { return sec };
    sec.title = format!("{} — {}, {}", t.agent_id, t.state, outcome_detail(r));
    for (label, bytes, dropped) in [
        ("stdout", &r.stdout, r.stdout_dropped),
        ("stderr", &r.stderr, r.stderr_dropped),
    ] {
        if bytes.is_empty() && dropped == 0 {
            continue;
        }
        let (text, cut) = truncate_output(bytes);
        if !text.is_empty() {
            let omitted_lines = lines_in(bytes).saturating_sub(lines_in(text.as_bytes()));
            sec.blocks.push(CodeBlock {
                label: label.to_string(),
                text,
                omitted_lines,
            });
        }
        if cut {
            sec.notes.push(format!(
                "{label} truncated in chat; full output: `output {} {}`",
                short_form(job_id),
                t.agent_id
            ));
        }
        if dropped > 0 {
            sec.notes.push(format!(
                "the agent dropped {dropped} bytes of {label} (over its output cap)"
            ));
        }
    }
    sec
}

/// `15 min`, `90 s`, `2 h`: a window shown to users.
/// A window as people say it: `15 min`, `2 h`, and what is left of one
/// after a restart the same way (`14 min 25 s`, `1 h 59 min`), never a
/// bare count of seconds above a minute.
pub fn format_duration(d: std::time::Duration) -> String {
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    match (h, m, s) {
        (0, 0, s) => format!("{s} s"),
        (0, m, 0) => format!("{m} min"),
        (0, m, s) => format!("{m} min {s} s"),
        (h, 0, _) => format!("{h} h"),
        (h, m, _) => format!("{h} h {m} min"),
    }
}

/// The request posted when a command needs approval: what would run where,
/// how many approvals it needs and how to give them (buttons too).
pub fn approval_request(
    short: &str,
    command: &str,
    argv: &[String],
    selector: &str,
    needed: u32,
    window: std::time::Duration,
    who: &str,
) -> Reply {
    Reply {
        header: format!(
            "job {short} `{command}` on {selector} needs {needed} approval{} within {}{}",
            if needed == 1 { "" } else { "s" },
            format_duration(window),
            asked_by(who)
        ),
        lines: vec![
            format!("would run (argv, no shell): {argv:?}"),
            format!(
                "approve with `approve {short}`, deny with `deny {short} <reason>`; not by the requester"
            ),
        ],
        sections: Vec::new(),
        actions: vec![
            Action {
                label: "Approve".into(),
                command: format!("approve {short}"),
                danger: false,
            },
            Action {
                label: "Deny".into(),
                command: format!("deny {short}"),
                danger: true,
            },
        ],
        thread: None,
    }
}

/// Sort key of a target state: failures (0), unfinished (1), fine (2).
fn failure_rank(state: &str) -> u8 {
    match state {
        "failed" | "timed_out" | "refused" | "offline" => 0,
        "ok" | "canceled" | "skipped" => 2,
        _ => 1,
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Lines of each host's output in a `job ID` summary; `output ID [HOST]`
/// (chat) and `fleetcmd job output ID [HOST]` show all of it.
pub const SUMMARY_LINES: usize = 5;

/// A job's progress while it runs, the same words in chat's edited message
/// and the CLI's progress line: `3/10 done, 1 failed, 12 s`.
pub fn progress(job: &v1::Job, now_ms: u64) -> String {
    let total = job.targets.len();
    let done = job.targets.iter().filter(|t| t.result.is_some()).count();
    let failed = job
        .targets
        .iter()
        .filter(|t| failure_rank(&t.state) == 0)
        .count();
    progress_text(
        done,
        total,
        failed,
        now_ms.saturating_sub(job.created_at_ms),
    )
}

/// [`progress`] from counts, for a caller that follows events.
pub fn progress_text(done: usize, total: usize, failed: usize, elapsed_ms: u64) -> String {
    format!(
        "{done}/{total} done, {failed} failed, {}",
        when::coarse(elapsed_ms)
    )
}

/// How many targets are in each state, failures first, then unfinished,
/// then fine: `1 failed, 1 timed_out, 3 ok`.
pub fn state_counts(job: &v1::Job) -> String {
    let mut counts: Vec<(u8, &str, usize)> = Vec::new();
    for t in &job.targets {
        match counts.iter_mut().find(|(_, s, _)| *s == t.state) {
            Some(c) => c.2 += 1,
            None => counts.push((failure_rank(&t.state), &t.state, 1)),
        }
    }
    counts.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
    if counts.is_empty() {
        return "no targets".into();
    }
    counts
        .iter()
        .map(|(_, s, n)| format!("{n} {s}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The job's targets, failures first, then unfinished, then fine (stable:
/// hosts keep their order within each group).
pub fn failures_first(job: &v1::Job) -> Vec<&v1::Target> {
    let mut order: Vec<&v1::Target> = job.targets.iter().collect();
    order.sort_by_key(|t| failure_rank(&t.state));
    order
}

/// The first `n` lines of `bytes` (lossy UTF-8, trailing newline ignored)
/// and how many lines were left out.
pub fn first_lines(bytes: &[u8], n: usize) -> (String, usize) {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim_end_matches('\n');
    if text.is_empty() {
        return (String::new(), 0);
    }
    let total = text.split('\n').count();
    let shown: Vec<&str> = text.split('\n').take(n).collect();
    (shown.join("\n"), total.saturating_sub(n))
}

/// When a job was created and how long its slowest host ran:
/// `created 2026-12-06T05:52:33Z (3 min ago), slowest host 1.5 s`.
pub fn job_times(job: &v1::Job, now_ms: u64) -> String {
    let mut s = format!("created {}", when::stamp(now_ms, job.created_at_ms));
    if let Some(ms) = slowest_ms(job) {
        let _ = write!(s, ", slowest host {}", when::elapsed(ms));
    }
    s
}

/// The longest run time of the job's finished hosts.
pub fn slowest_ms(job: &v1::Job) -> Option<u64> {
    job.targets
        .iter()
        .filter_map(|t| t.result.as_ref().map(|r| r.duration_ms))
        .max()
}

/// A job's state and per-host results, failures first; used while it runs
/// and when it ends (the router edits the live message with it).
pub fn job(job: &v1::Job) -> Reply {
    job_at(job, now_ms())
}

/// [`job`] at a given time (elapsed time in the progress header).
pub fn job_at(job: &v1::Job, now_ms: u64) -> Reply {
    let total = job.targets.len();
    let ok = job.targets.iter().filter(|t| t.state == "ok").count();
    let header = if is_terminal(&job.state) {
        format!(
            "job {} {} ({ok}/{total} ok){}",
            short_form(&job.job_id),
            job.state,
            asked_by(&job.requester)
        )
    } else {
        format!(
            "job {} {} ({}){}",
            short_form(&job.job_id),
            job.state,
            progress(job, now_ms),
            asked_by(&job.requester)
        )
    };
    let failed = job
        .targets
        .iter()
        .filter(|t| failure_rank(&t.state) == 0)
        .count();
    let mut lines = vec![format!("`{}` on {}", job.command, job.selector)];
    if failed > 0 {
        lines.push(format!("{failed} failed (listed first)"));
    }
    // Failures first, then hosts still running, then successes.
    let mut sections: Vec<Section> = failures_first(job)
        .into_iter()
        .take(MAX_HOST_SECTIONS)
        .map(|t| target_section(&job.job_id, t))
        .collect();
    if total > MAX_HOST_SECTIONS {
        sections.push(Section {
            title: format!(
                "… and {} more hosts; `jobs` and `job {}` list them",
                total - MAX_HOST_SECTIONS,
                short_form(&job.job_id)
            ),
            ..Section::default()
        });
    }
    Reply {
        header,
        lines,
        sections,
        ..Reply::default()
    }
}

/// `job ID`: a summary — counts by state, times, then each host failures
/// first with the first [`SUMMARY_LINES`] lines of its output and the
/// `output` command that shows the rest. Someone other than the requester
/// is named in the header.
pub fn job_for(j: &v1::Job, who: &str) -> Reply {
    job_summary(j, who, now_ms())
}

/// [`job_for`] at a given time.
pub fn job_summary(j: &v1::Job, who: &str, now_ms: u64) -> Reply {
    let short = short_form(&j.job_id);
    let total = j.targets.len();
    let ok = j.targets.iter().filter(|t| t.state == "ok").count();
    let mut header = if is_terminal(&j.state) {
        format!("job {short} {} ({ok}/{total} ok)", j.state)
    } else {
        format!("job {short} {} ({})", j.state, progress(j, now_ms))
    };
    header.push_str(&asked_by(&j.requester));
    if j.requester != who {
        header.push_str(&format!(" (shown to {who})"));
    }
    let mut lines = vec![
        format!("`{}` on {}", j.command, j.selector),
        job_times(j, now_ms),
        state_counts(j),
    ];
    if !j.reason.is_empty() {
        lines.push(j.reason.clone());
    }
    let mut sections: Vec<Section> = failures_first(j)
        .into_iter()
        .take(MAX_HOST_SECTIONS)
        .map(|t| {
            let mut sec = Section {
                title: match &t.result {
                    Some(r) => format!("{} — {}, {}", t.agent_id, t.state, outcome_detail(r)),
                    None => format!("{} — {}", t.agent_id, t.state),
                },
                ..Section::default()
            };
            let Some(r) = &t.result else { return sec };
            let mut more = 0;
            for (label, bytes) in [("stdout", &r.stdout), ("stderr", &r.stderr)] {
                let (text, left) = first_lines(bytes, SUMMARY_LINES);
                more += left;
                if !text.is_empty() {
                    sec.blocks.push(CodeBlock {
                        label: label.into(),
                        text,
                        // Counted in the note below, with the way to the rest.
                        omitted_lines: 0,
                    });
                }
            }
            if more > 0 {
                sec.notes.push(format!(
                    "{more} more line{}: `output {short} {}`",
                    if more == 1 { "" } else { "s" },
                    t.agent_id
                ));
            }
            sec
        })
        .collect();
    if total > MAX_HOST_SECTIONS {
        sections.push(Section {
            title: format!(
                "… and {} more hosts; `output {short}` shows every host",
                total - MAX_HOST_SECTIONS
            ),
            ..Section::default()
        });
    }
    Reply {
        header,
        lines,
        sections,
        ..Reply::default()
    }
}

/// Largest output a chat `output` reply carries per stream; the CLI's
/// `fleetcmd job output` has all of it.
const MAX_FULL_OUTPUT: usize = 64 * 1024;

/// `output ID [HOST]`: each host's full stored output (up to a chat-sized
/// cap), as inert blocks.
pub fn output_for(j: &v1::Job, host: Option<&str>, who: &str) -> Reply {
    let targets: Vec<&v1::Target> = j
        .targets
        .iter()
        .filter(|t| host.is_none_or(|h| t.agent_id == h))
        .collect();
    let header = format!(
        "output of job {} `{}`{}{}",
        short_form(&j.job_id),
        j.command,
        host.map(|h| format!(" on {h}")).unwrap_or_default(),
        asked_by(who)
    );
    if targets.is_empty() {
        return Reply::text(format!("{header}: no such host in this job"));
    }
    let sections = targets
        .into_iter()
        .map(|t| {
            let r = t.result.clone().unwrap_or_default();
            let mut notes = vec![format!("state {}", t.state)];
            let mut blocks = Vec::new();
            for (label, bytes, dropped) in [
                ("stdout", &r.stdout, r.stdout_dropped),
                ("stderr", &r.stderr, r.stderr_dropped),
            ] {
                if bytes.is_empty() {
                    continue;
                }
                let kept = &bytes[..bytes.len().min(MAX_FULL_OUTPUT)];
                let omitted_lines = lines_in(bytes).saturating_sub(lines_in(kept));
                let text = String::from_utf8_lossy(kept).into_owned();
                if bytes.len() > MAX_FULL_OUTPUT {
                    notes.push(format!(
                        "{label}: first {MAX_FULL_OUTPUT} of {} bytes; `fleetcmd job output` has all",
                        bytes.len()
                    ));
                }
                if dropped > 0 {
                    notes.push(format!("{label}: the agent dropped {dropped} bytes over its cap"));
                }
                blocks.push(CodeBlock { label: label.into(), text, omitted_lines });
            }
            Section { title: t.agent_id.clone(), notes, blocks }
        })
        .collect();
    Reply {
        header,
        sections,
        ..Reply::default()
    }
}

/// Recent jobs as a table.
/// Which page of `jobs` a reply shows.
#[derive(Clone, Copy, Debug)]
pub struct JobsPage {
    pub mine: bool,
    pub page: u32,
    /// The position of the page's first job (1 for page 1).
    pub first: usize,
    /// Older jobs follow on the next page.
    pub more: bool,
}

pub fn jobs(jobs: &[v1::Job], who: &str, at: JobsPage) -> Reply {
    let title = if at.mine {
        "your recent jobs"
    } else {
        "recent jobs"
    };
    let count = match (at.page, jobs.len()) {
        (1, n) if !at.more => format!("({n})"),
        (_, 0) => format!("page {}: none", at.page),
        (_, n) => format!("page {}: {}-{}", at.page, at.first, at.first + n - 1),
    };
    let header = format!("{title} {count}{}", asked_by(who));
    if jobs.is_empty() {
        return Reply::text(header);
    }
    let mut lines = Vec::new();
    if at.more {
        lines.push(format!(
            "older: `jobs {}page {}`",
            if at.mine { "mine " } else { "" },
            at.page + 1
        ));
    }
    let now = now_ms();
    let mut text = String::new();
    for j in jobs {
        let ok = j.targets.iter().filter(|t| t.state == "ok").count();
        let (age, duration) = age_and_duration(j, now);
        let _ = writeln!(
            text,
            "{:<18}  {:<10}  {:>3}/{:<3} {:>10} {:>10}  {:<12} {:<24} {}",
            short_form(&j.job_id),
            j.state,
            ok,
            j.targets.len(),
            age,
            duration,
            j.command,
            j.selector,
            j.requester
        );
    }
    Reply {
        header,
        lines,
        sections: vec![Section {
            blocks: vec![CodeBlock {
                label: String::new(),
                text: text.trim_end().to_string(),
                omitted_lines: 0,
            }],
            ..Section::default()
        }],
        ..Reply::default()
    }
}

/// The AGE and DURATION columns of a jobs table: how long ago the job was
/// created (`3 min ago`), and how long its slowest host ran (`1.5 s`; `-`
/// while no host has finished).
pub fn age_and_duration(j: &v1::Job, now_ms: u64) -> (String, String) {
    (
        when::relative(now_ms, j.created_at_ms),
        slowest_ms(j).map_or_else(|| "-".into(), when::elapsed),
    )
}

/// The agents table of `agents` / `status`.
fn check_label(s: i32) -> &'static str {
    match v1::CheckState::try_from(s) {
        Ok(v1::CheckState::Ok) => "OK",
        Ok(v1::CheckState::Warning) => "WARN",
        Ok(v1::CheckState::Critical) => "CRIT",
        _ => "UNKNOWN",
    }
}

/// How bad an agent looks, for worst-first listings: revoked or offline,
/// then a critical/unknown check, then a warning, then fine.
fn agent_badness(a: &v1::Agent) -> u8 {
    if a.revoked || !a.online {
        return 3;
    }
    let worst = a
        .checks
        .iter()
        .map(|c| match v1::CheckState::try_from(c.state) {
            Ok(v1::CheckState::Ok) => 0,
            Ok(v1::CheckState::Warning) => 1,
            _ => 2,
        })
        .max()
        .unwrap_or(0);
    worst.max(u8::from(!a.problems.is_empty()))
}

/// The CHECKS column: failing checks by name, or how many pass.
fn checks_column(a: &v1::Agent) -> String {
    if a.checks.is_empty() {
        return "-".into();
    }
    let failing: Vec<String> = a
        .checks
        .iter()
        .filter(|c| c.state != v1::CheckState::Ok as i32)
        .map(|c| format!("{}:{}", c.name, check_label(c.state)))
        .collect();
    if failing.is_empty() {
        format!("{} ok", a.checks.len())
    } else {
        failing.join(",")
    }
}

/// `agents` / `status`: worst first (offline, failing checks, warnings),
/// with load, memory, the agents' checks and when each was last heard from.
pub fn agents(agents: &[v1::Agent], selector: Option<&str>, who: &str) -> Reply {
    agents_at(agents, selector, who, now_ms())
}

/// [`agents`] at a given time (the SEEN column).
pub fn agents_at(agents: &[v1::Agent], selector: Option<&str>, who: &str, now_ms: u64) -> Reply {
    let online = agents.iter().filter(|a| a.online && !a.revoked).count();
    let header = format!(
        "agents{}: {} ({} online){}",
        selector
            .map(|s| format!(" matching {s}"))
            .unwrap_or_default(),
        agents.len(),
        online,
        asked_by(who)
    );
    if agents.is_empty() {
        return Reply::text(header);
    }
    let mut sorted: Vec<&v1::Agent> = agents.iter().collect();
    sorted.sort_by(|a, b| {
        agent_badness(b)
            .cmp(&agent_badness(a))
            .then_with(|| a.agent_id.cmp(&b.agent_id))
    });
    let mut text = format!(
        "{:<24} {:<8} {:>6} {:>5}  {:<18} {:<10} {:<12} {}\n",
        "AGENT", "STATE", "LOAD1", "MEM%", "CHECKS", "VERSION", "SEEN", "LABELS"
    );
    for a in sorted {
        let state = if a.revoked {
            "revoked"
        } else if a.online {
            "online"
        } else {
            "offline"
        };
        let (load, mem) = match &a.metrics {
            Some(m) if m.mem_total_bytes > 0 => (
                format!("{:.2}", m.load1),
                format!(
                    "{:.0}",
                    m.mem_used_bytes as f64 * 100.0 / m.mem_total_bytes as f64
                ),
            ),
            Some(m) => (format!("{:.2}", m.load1), "-".to_string()),
            None => ("-".to_string(), "-".to_string()),
        };
        let labels: Vec<String> = {
            let mut l: Vec<_> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            l.sort();
            l
        };
        let row = format!(
            "{:<24} {:<8} {:>6} {:>5}  {:<18} {:<10} {:<12} {}",
            a.agent_id,
            state,
            load,
            mem,
            checks_column(a),
            if a.version.is_empty() {
                "-"
            } else {
                &a.version
            },
            when::relative(now_ms, a.last_seen_ms),
            labels.join(",")
        );
        let _ = writeln!(text, "{}", row.trim_end());
    }
    code_reply(header, text)
}

fn code_reply(header: String, text: String) -> Reply {
    Reply {
        header,
        sections: vec![Section {
            blocks: vec![CodeBlock {
                label: String::new(),
                text: text.trim_end().to_string(),
                omitted_lines: 0,
            }],
            ..Section::default()
        }],
        ..Reply::default()
    }
}

/// `health [service]` in chat: [`health_table`] with who asked.
pub fn health(services: &[v1::Service], one: bool, now_ms: u64, who: &str) -> Reply {
    let (header, text) = health_table(services, one, now_ms);
    if text.is_empty() {
        Reply::text(format!("{header}{}", asked_by(who)))
    } else {
        code_reply(format!("{header}{}", asked_by(who)), text)
    }
}

/// Every service worst first, or (`one`) the first service with its
/// instances and recent transitions: a header line and a table (empty
/// when there is nothing to list). Shared by chat and `fleetcmd health`.
pub fn health_table(services: &[v1::Service], one: bool, now_ms: u64) -> (String, String) {
    if services.is_empty() {
        return (
            "no services are configured ([services.NAME] in controller.toml)".into(),
            String::new(),
        );
    }
    let silenced = |s: &v1::Service| {
        if s.silenced_until_ms > now_ms {
            format!(
                "silenced until {} by {}",
                when::stamp(now_ms, s.silenced_until_ms),
                s.silenced_by
            )
        } else {
            String::new()
        }
    };
    if !one {
        let bad = services.iter().filter(|s| s.state != "ok").count();
        let header = format!("services: {} ({} not ok)", services.len(), bad);
        let mut text = format!(
            "{:<20} {:<9} {:>7}  {:<12} {}\n",
            "SERVICE", "STATE", "PASSING", "SINCE", "NOTE"
        );
        for s in services {
            let mut note = silenced(s);
            if s.flapping {
                note = format!("flapping {note}").trim().to_string();
            }
            let row = format!(
                "{:<20} {:<9} {:>7}  {:<12} {}",
                s.name,
                s.state,
                format!("{}/{}", s.passing, s.total),
                when::relative(now_ms, s.since_ms),
                note
            );
            let _ = writeln!(text, "{}", row.trim_end());
        }
        return (header, text.trim_end().to_string());
    }
    let s = &services[0];
    let mut header = format!(
        "{} is {} ({} of {} instances pass; check {:?} on {})",
        s.name, s.state, s.passing, s.total, s.check, s.selector
    );
    if s.since_ms != 0 {
        header.push_str(&format!(" since {}", when::stamp(now_ms, s.since_ms)));
    }
    let note = silenced(s);
    if !note.is_empty() {
        header.push_str(&format!(" · {note}: {}", s.silence_reason));
    }
    let mut text = format!(
        "{:<24} {:<8} {:<9} {}\n",
        "INSTANCE", "AGENT", "CHECK", "SUMMARY"
    );
    let mut instances: Vec<&v1::ServiceInstance> = s.instances.iter().collect();
    instances.sort_by_key(|i| {
        (
            i.online && i.state == v1::CheckState::Ok as i32,
            i.agent_id.clone(),
        )
    });
    for i in instances {
        let _ = writeln!(
            text,
            "{:<24} {:<8} {:<9} {}",
            i.agent_id,
            if i.online { "online" } else { "offline" },
            if i.online { check_label(i.state) } else { "-" },
            i.summary.lines().next().unwrap_or_default()
        );
    }
    if !s.history.is_empty() {
        let _ = writeln!(text, "\nrecent changes:");
        for t in &s.history {
            let _ = writeln!(
                text,
                "  {} {} → {} ({}/{})",
                when::stamp(now_ms, t.at_ms),
                t.from,
                t.to,
                t.passing,
                t.total
            );
        }
    }
    (header, text.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An outside test saw "within 865 s" for a request reopened after a
    /// restart, next to "within 15 min" for the first one.
    #[test]
    fn durations_read_as_people_say_them() {
        use std::time::Duration;
        for (secs, want) in [
            (0, "0 s"),
            (59, "59 s"),
            (900, "15 min"),
            (865, "14 min 25 s"),
            (3600, "1 h"),
            (7200, "2 h"),
            (7140 + 3600, "2 h 59 min"),
            (3661, "1 h 1 min"),
        ] {
            assert_eq!(format_duration(Duration::from_secs(secs)), want, "{secs}");
        }
    }

    #[test]
    fn sanitize_replaces_controls_but_keeps_tabs() {
        for (input, expected) in [
            ("plain", "plain"),
            ("a\tb", "a\tb"),
            ("\x1b[31mred", "\u{FFFD}[31mred"),
            ("over\rwrite", "over\u{FFFD}write"),
            ("bell\x07", "bell\u{FFFD}"),
            ("rtl\u{202E}txt", "rtl\u{FFFD}txt"),
            ("zero\u{200B}width", "zero\u{FFFD}width"),
            ("line\nbreak", "line\u{FFFD}break"),
        ] {
            assert_eq!(sanitize(input), expected, "{input:?}");
        }
    }

    #[test]
    fn truncation() {
        assert_eq!(truncate_output(b"a\nb\n"), ("a\nb".to_string(), false));
        let many: String = (0..100).map(|i| format!("{i}\n")).collect();
        let (text, cut) = truncate_output(many.as_bytes());
        assert!(cut);
        assert_eq!(text.lines().count(), MAX_OUTPUT_LINES);
        let long = "x".repeat(MAX_OUTPUT_CHARS * 2);
        let (text, cut) = truncate_output(long.as_bytes());
        assert!(cut);
        assert!(text.chars().count() < MAX_OUTPUT_CHARS);
        assert_eq!(truncate_output(&[0xff, b'a']).0, "\u{FFFD}a");
    }

    #[test]
    fn job_reply_names_requester_and_dropped_bytes() {
        let j = v1::Job {
            job_id: "01890a5d-ac96-774b-bcce-b302099a8057".into(),
            command: "uptime".into(),
            selector: "all".into(),
            requester: "console:alice".into(),
            state: "failed".into(),
            targets: vec![
                v1::Target {
                    agent_id: "web-1".into(),
                    state: "ok".into(),
                    result: Some(v1::JobResult {
                        exit_code: Some(0),
                        stdout: b"up 3 days".to_vec(),
                        duration_ms: 12,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                v1::Target {
                    agent_id: "web-2".into(),
                    state: "failed".into(),
                    result: Some(v1::JobResult {
                        exit_code: Some(2),
                        stderr_dropped: 10,
                        duration_ms: 1500,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let r = job(&j);
        assert_eq!(
            r.header,
            "job b302099a8057 failed (1/2 ok) — asked by console:alice"
        );
        // Failures first.
        assert_eq!(r.lines[1], "1 failed (listed first)");
        assert_eq!(r.sections[0].title, "web-2 — failed, exit 2, 1.5 s");
        assert!(
            r.sections[0].notes[0].contains("dropped 10 bytes of stderr"),
            "{:?}",
            r.sections[0].notes
        );
        assert_eq!(r.sections[1].title, "web-1 — ok, exit 0, 12 ms");
        assert_eq!(r.sections[1].blocks[0].text, "up 3 days");
    }

    // 2026-12-06T05:52:33Z
    const T: u64 = 1_796_536_353_000;

    fn target(host: &str, state: &str, stdout: &str, ms: u64) -> v1::Target {
        v1::Target {
            agent_id: host.into(),
            state: state.into(),
            result: Some(v1::JobResult {
                exit_code: Some(i32::from(state != "ok")),
                stdout: stdout.as_bytes().to_vec(),
                duration_ms: ms,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn ten_lines(host: &str) -> String {
        (1..=10).map(|i| format!("{host} line {i}\n")).collect()
    }

    #[test]
    fn job_summary_counts_states_puts_failures_first_and_shows_first_lines() {
        let j = v1::Job {
            job_id: "01890a5d-ac96-774b-bcce-b302099a8057".into(),
            command: "df".into(),
            selector: "all".into(),
            requester: "console:alice".into(),
            state: "failed".into(),
            created_at_ms: T,
            targets: vec![
                target("web-1", "ok", &ten_lines("web-1"), 1_200),
                target("web-2", "failed", &ten_lines("web-2"), 2_500),
                target("web-3", "ok", "one line\n", 300),
            ],
            ..Default::default()
        };
        let r = job_summary(&j, "console:bob", T + 3 * 60_000);
        let mut text = vec![r.header.clone()];
        text.extend(r.lines.iter().cloned());
        for sec in &r.sections {
            text.push(format!("## {}", sec.title));
            for b in &sec.blocks {
                text.push(b.text.clone());
            }
            text.extend(sec.notes.iter().cloned());
        }
        let text = text.join("\n");
        // The failure comes first, each host shows SUMMARY_LINES lines and
        // says how to see the rest; nothing says "line 6".
        assert!(r.sections[0].title.starts_with("web-2 — failed"), "{text}");
        assert!(!text.contains("line 6"), "{text}");
        assert!(
            text.contains("5 more lines: `output b302099a8057 web-1`"),
            "{text}"
        );
        assert!(!text.contains("output b302099a8057 web-3"), "{text}");
        insta::assert_snapshot!(text);
    }

    #[test]
    fn jobs_table_has_age_and_duration() {
        let j = v1::Job {
            created_at_ms: T,
            targets: vec![
                target("web-1", "ok", "", 1_200),
                target("web-2", "ok", "", 65_000),
            ],
            ..Default::default()
        };
        assert_eq!(
            age_and_duration(&j, T + 3 * 60_000),
            ("3 min ago".to_string(), "1 min 5 s".to_string())
        );
        let running = v1::Job {
            created_at_ms: T,
            targets: vec![v1::Target {
                agent_id: "web-1".into(),
                state: "running".into(),
                result: None,
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            age_and_duration(&running, T + 5_000),
            ("5 s ago".to_string(), "-".to_string())
        );
    }

    #[test]
    fn a_running_job_shows_done_failed_and_elapsed() {
        let mut j = v1::Job {
            job_id: "01890a5d-ac96-774b-bcce-b302099a8057".into(),
            requester: "console:alice".into(),
            state: "running".into(),
            created_at_ms: T,
            targets: vec![
                target("web-1", "ok", "", 10),
                target("web-2", "failed", "", 10),
                v1::Target {
                    agent_id: "web-3".into(),
                    state: "running".into(),
                    result: None,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        assert_eq!(progress(&j, T + 12_000), "2/3 done, 1 failed, 12 s");
        assert_eq!(
            job_at(&j, T + 12_000).header,
            "job b302099a8057 running (2/3 done, 1 failed, 12 s) — asked by console:alice"
        );
        j.state = "failed".into();
        assert_eq!(
            job_at(&j, T + 12_000).header,
            "job b302099a8057 failed (1/3 ok) — asked by console:alice"
        );
    }

    #[test]
    fn health_shows_since_and_history_as_rfc3339_and_relative() {
        let s = v1::Service {
            name: "api".into(),
            state: "degraded".into(),
            since_ms: T,
            passing: 1,
            total: 2,
            history: vec![v1::ServiceTransition {
                from: "ok".into(),
                to: "degraded".into(),
                at_ms: T,
                passing: 1,
                total: 2,
            }],
            ..Default::default()
        };
        let now = T + 2 * 3_600_000;
        let (header, table) = health_table(std::slice::from_ref(&s), true, now);
        assert!(
            header.contains("since 2026-12-06T05:52:33Z (2 h ago)"),
            "{header}"
        );
        assert!(
            table.contains("2026-12-06T05:52:33Z (2 h ago) ok → degraded (1/2)"),
            "{table}"
        );
        let (_, list) = health_table(&[s], false, now);
        assert!(list.contains("2 h ago"), "{list}");
    }

    #[test]
    fn agents_show_when_each_was_last_seen() {
        let agent = |id: &str, online: bool, seen: u64| v1::Agent {
            agent_id: id.into(),
            online,
            last_seen_ms: seen,
            ..Default::default()
        };
        let r = agents_at(
            &[
                agent("web-1", true, T - 2_000),
                agent("web-2", false, T - 3_600_000),
            ],
            None,
            "console:alice",
            T,
        );
        let table = &r.sections[0].blocks[0].text;
        let row = |id: &str| {
            table
                .lines()
                .find(|l| l.starts_with(id))
                .unwrap_or_else(|| panic!("{id} in {table}"))
                .to_string()
        };
        assert!(
            table.lines().next().is_some_and(|h| h.contains(" SEEN ")),
            "{table}"
        );
        assert!(row("web-1").ends_with(" 2 s ago"), "{table}");
        assert!(
            row("web-2").ends_with(" 1 h ago"),
            "no trailing blanks: {table}"
        );
    }
}
