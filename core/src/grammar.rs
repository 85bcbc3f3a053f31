//! The chat command grammar, shared by every chat adapter.
//!
//! Messages are split into words; double- or single-quoted strings form one
//! word. Quoting is parsed here and never passed to a shell: values end up
//! as single argv elements.
//!
//! These are the built-in verbs only; verbs that integrations add (the
//! gateway's `query`, `oncall`, plugins' commands) are not known here and
//! parse as [`GrammarError::UnknownCommand`], which the gateway then looks
//! up among its registered commands.

use std::time::Duration;

use crate::duration::{parse_duration, parse_job_timeout};
use crate::selector::Selector;
use crate::terminal::excerpt;

/// A parsed chat command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChatCommand {
    Help(Option<String>),
    Run(RunRequest),
    Job(String),
    /// `jobs [mine] [page N]`: page 1 is the newest [`JOBS_PAGE`] jobs.
    Jobs {
        mine: bool,
        page: u32,
    },
    Output {
        id: String,
        host: Option<String>,
    },
    Cancel(String),
    Approve(String),
    Deny {
        id: String,
        reason: Option<String>,
    },
    Agents(Option<String>),
    Status(Option<String>),
    Health(Option<String>),
    /// `silence <service> <duration> [reason…]`; `silence <service> off`
    /// lifts it (`for_` is then `None`).
    Silence {
        service: String,
        for_: Option<Duration>,
        reason: Option<String>,
    },
    Audit(String),
    Whoami,
    Policy,
}

/// Jobs on one page of `jobs`.
pub const JOBS_PAGE: u32 = 10;
/// The oldest page `jobs` shows (the newest 500 jobs).
pub const MAX_JOBS_PAGE: u32 = 50;

/// `run <command> [args…] on <selector> [options]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunRequest {
    pub command: String,
    /// Positional argument values, verbatim (quotes removed).
    pub args: Vec<String>,
    /// The selector text; it is known to parse with [`Selector::parse`].
    pub selector: String,
    pub options: RunOptions,
}

/// Rate control and dry-run options of `run`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunOptions {
    pub batch: Option<Limit>,
    pub max_errors: Option<Limit>,
    pub canary: Option<u32>,
    pub timeout: Option<Duration>,
    pub dry_run: bool,
}

/// A number of targets or a percentage of them (`5` or `25%`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Limit {
    Count(u32),
    /// 1..=100.
    Percent(u8),
}

impl Limit {
    /// The number of targets out of `total` this limit allows; a percentage
    /// rounds up and never gives 0 for a non-empty job.
    ///
    /// ```
    /// use fleetcmd_core::grammar::Limit;
    /// assert_eq!(Limit::Percent(25).of(10), 3);
    /// assert_eq!(Limit::Count(5).of(3), 5);
    /// ```
    pub fn of(self, total: u32) -> u32 {
        match self {
            Limit::Count(n) => n,
            Limit::Percent(p) => (u64::from(total) * u64::from(p)).div_ceil(100).max(1) as u32,
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::Count(n) => write!(f, "{n}"),
            Limit::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl TryFrom<String> for Limit {
    type Error = String;
    fn try_from(s: String) -> Result<Limit, String> {
        parse_limit(&s)
    }
}

impl From<Limit> for String {
    fn from(l: Limit) -> String {
        l.to_string()
    }
}

const SILENCE_USAGE: &str = "silence <service> <duration> [reason] | silence <service> off";
const RUN_USAGE: &str = "run <command> [args] on <selector> [--batch N|N%] [--max-errors N|N%] [--canary N] [--timeout D] [--dry-run]";

/// What `help VERB` says about one verb of the grammar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerbHelp {
    pub verb: &'static str,
    pub usage: &'static str,
    /// One line on what it does.
    pub about: &'static str,
    /// Further lines: options and rules worth knowing.
    pub details: &'static [&'static str],
}

/// Every verb of the grammar, in the order `help` lists them; [`parse`]
/// accepts exactly these first words.
pub const VERBS: &[VerbHelp] = &[
    VerbHelp {
        verb: "run",
        usage: RUN_USAGE,
        about: "run an allow-listed command on the agents the selector picks",
        details: &[
            "--batch N|N%: start at most N hosts (or N% of them) at a time",
            "--max-errors N|N%: stop starting hosts once more than N (or N%) have failed",
            "--canary N: run on N hosts first; the rest start only if those succeed",
            "--timeout D: stop each host's run after D (whole seconds, at least 1s; e.g. 30s, 5m), capped by the command's own timeout",
            "--dry-run: show the argv and the hosts it would run on; nothing is submitted",
            "selectors: all, name=web-*, role=web, role in (web,api), !draining, joined by commas",
        ],
    },
    VerbHelp {
        verb: "job",
        usage: "job <id>",
        about: "a job's state and each host's result",
        details: &[],
    },
    VerbHelp {
        verb: "jobs",
        usage: "jobs [mine] [page N]",
        about: "recent jobs you may see, newest first (`mine`: only yours)",
        details: &["ten jobs a page; `page 2` shows the ten before them, up to page 50"],
    },
    VerbHelp {
        verb: "output",
        usage: "output <id> [host]",
        about: "the stored output of a job, for every host or one",
        details: &[],
    },
    VerbHelp {
        verb: "cancel",
        usage: "cancel <id>",
        about: "cancel a job: its requester, or someone who may run its command on its hosts here",
        details: &[],
    },
    VerbHelp {
        verb: "approve",
        usage: "approve <id>",
        about: "approve a job that waits for approval (not your own)",
        details: &[],
    },
    VerbHelp {
        verb: "deny",
        usage: "deny <id> [reason]",
        about: "deny a job that waits for approval; nothing runs",
        details: &[],
    },
    VerbHelp {
        verb: "agents",
        usage: "agents [selector]",
        about: "agents, their labels and whether they are online",
        details: &[],
    },
    VerbHelp {
        verb: "status",
        usage: "status [selector]",
        about: "the same as `agents`",
        details: &[],
    },
    VerbHelp {
        verb: "health",
        usage: "health [service]",
        about: "the health of the services the controller checks",
        details: &[],
    },
    VerbHelp {
        verb: "silence",
        usage: SILENCE_USAGE,
        about: "mute alerts for a service for a while (e.g. 30m), or lift the silence",
        details: &[],
    },
    VerbHelp {
        verb: "audit",
        usage: "audit <query> | audit verify",
        about: "the newest audit records you may read that match the query; `verify` checks the chain",
        details: &[],
    },
    VerbHelp {
        verb: "whoami",
        usage: "whoami",
        about: "your identity and roles",
        details: &[],
    },
    VerbHelp {
        verb: "policy",
        usage: "policy",
        about: "the policy version in force",
        details: &[],
    },
    VerbHelp {
        verb: "help",
        usage: "help [verb or command]",
        about: "the commands you may run here, or help on one verb or command",
        details: &[],
    },
];

/// Help for `verb` (any case), if it is a verb of the grammar.
///
/// ```
/// use fleetcmd_core::grammar::verb_help;
/// assert!(verb_help("RUN").unwrap().usage.contains("--canary"));
/// assert_eq!(verb_help("restart"), None);
/// ```
pub fn verb_help(verb: &str) -> Option<&'static VerbHelp> {
    VERBS.iter().find(|v| v.verb.eq_ignore_ascii_case(verb))
}

/// Why a chat message could not be parsed.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum GrammarError {
    #[error("empty command; try `help`")]
    Empty,
    #[error("unknown command `{0}`; try `help`")]
    UnknownCommand(String),
    #[error("unterminated quote starting at `{0}`")]
    UnterminatedQuote(String),
    #[error("usage: {0}")]
    Usage(&'static str),
    #[error("a target is required: run <command> [args] on <selector>")]
    MissingTarget,
    #[error("{0}")]
    BadSelector(String),
    #[error(
        "unknown option `{0}`; options are --batch, --max-errors, --canary, --timeout and --dry-run"
    )]
    UnknownOption(String),
    #[error("option `{option}`: {reason}")]
    BadOption { option: String, reason: String },
    #[error("unexpected `{0}` after the options; options go last")]
    Unexpected(String),
}

/// Returns the command text when the message is addressed to the bot: it
/// starts with `!`, `@<bot_name>`, `<bot_name>:` or `<bot_name>,` (name
/// case-insensitive), or `direct` is true (a direct conversation). The
/// prefix and surrounding whitespace are removed.
///
/// ```
/// use fleetcmd_core::grammar::addressed;
/// assert_eq!(addressed("!run uptime on all", "fleetcmd", false), Some("run uptime on all"));
/// assert_eq!(addressed("@FleetCmd jobs", "fleetcmd", false), Some("jobs"));
/// assert_eq!(addressed("fleetcmd, help", "fleetcmd", false), Some("help"));
/// assert_eq!(addressed("hello all", "fleetcmd", false), None);
/// ```
pub fn addressed<'a>(text: &'a str, bot_name: &str, direct: bool) -> Option<&'a str> {
    let t = text.trim();
    if let Some(rest) = t.strip_prefix('!') {
        return Some(rest.trim());
    }
    if !bot_name.is_empty() {
        if let Some(rest) = t
            .strip_prefix('@')
            .and_then(|r| strip_prefix_ci(r, bot_name))
            && (rest.is_empty()
                || rest.starts_with(char::is_whitespace)
                || rest.starts_with([':', ',']))
        {
            return Some(rest.strip_prefix([':', ',']).unwrap_or(rest).trim());
        }
        if let Some(rest) = strip_prefix_ci(t, bot_name).and_then(|r| r.strip_prefix([':', ','])) {
            return Some(rest.trim());
        }
    }
    direct.then_some(t)
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Word {
    text: String,
    quoted: bool,
}

/// Splits on whitespace; a word starting with `"`, `'`, `“` or `‘` runs to
/// the matching close quote (backslash escapes `\"` and `\\` inside double
/// quotes). Quotes inside a bare word are literal (`don't`).
fn tokenize(s: &str) -> Result<Vec<Word>, GrammarError> {
    let mut words = Vec::new();
    let mut chars = s.char_indices().peekable();
    while let Some(&(start, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut text = String::new();
        let mut quoted = false;
        let close = match c {
            '"' => Some(('"', true)),
            '\'' => Some(('\'', false)),
            '“' => Some(('”', true)),
            '‘' => Some(('’', false)),
            _ => None,
        };
        if let Some((close, escapes)) = close {
            chars.next();
            quoted = true;
            let mut closed = false;
            while let Some((_, ch)) = chars.next() {
                if ch == close {
                    closed = true;
                    break;
                }
                if escapes
                    && ch == '\\'
                    && let Some(&(_, next)) = chars.peek()
                    && (next == '\\' || next == '"' || next == close)
                {
                    text.push(next);
                    chars.next();
                    continue;
                }
                text.push(ch);
            }
            if !closed {
                let shown: String = s[start..].chars().take(20).collect();
                return Err(GrammarError::UnterminatedQuote(excerpt(&shown)));
            }
        }
        while let Some(&(_, ch)) = chars.peek() {
            if ch.is_whitespace() {
                break;
            }
            text.push(ch);
            chars.next();
        }
        words.push(Word { text, quoted });
    }
    Ok(words)
}

/// The words of a message, split and unquoted as [`parse`] does (for
/// commands the grammar does not know itself, e.g. gateway plugins').
pub fn words(text: &str) -> Result<Vec<String>, GrammarError> {
    Ok(tokenize(text)?.into_iter().map(|w| w.text).collect())
}

/// Parses the command text (as returned by [`addressed`]).
///
/// ```
/// use fleetcmd_core::grammar::{parse, ChatCommand};
/// let ChatCommand::Run(run) = parse(r#"run grep "two words" on role in (web,api) --batch 25%"#).unwrap() else { panic!() };
/// assert_eq!(run.args, ["two words"]);
/// assert_eq!(run.selector, "role in (web,api)");
/// ```
pub fn parse(text: &str) -> Result<ChatCommand, GrammarError> {
    let words = tokenize(text)?;
    let Some((first, rest)) = words.split_first() else {
        return Err(GrammarError::Empty);
    };
    let texts: Vec<&str> = rest.iter().map(|w| w.text.as_str()).collect();
    let joined = || (!texts.is_empty()).then(|| texts.join(" "));
    let one = |usage: &'static str| match texts.as_slice() {
        [id] => Ok(id.to_string()),
        _ => Err(GrammarError::Usage(usage)),
    };
    let none = |cmd: ChatCommand, usage: &'static str| {
        if texts.is_empty() {
            Ok(cmd)
        } else {
            Err(GrammarError::Usage(usage))
        }
    };
    match first.text.to_ascii_lowercase().as_str() {
        "help" => match texts.as_slice() {
            [] => Ok(ChatCommand::Help(None)),
            [c] => Ok(ChatCommand::Help(Some(c.to_string()))),
            _ => Err(GrammarError::Usage("help [command]")),
        },
        "run" => parse_run(rest).map(ChatCommand::Run),
        "job" => one("job <id>").map(ChatCommand::Job),
        "jobs" => {
            let usage = GrammarError::Usage("jobs [mine] [page N]");
            let (mine, page) = match texts.as_slice() {
                [] => (false, None),
                ["mine"] => (true, None),
                ["page", n] => (false, Some(*n)),
                ["mine", "page", n] => (true, Some(*n)),
                _ => return Err(usage),
            };
            let page = match page {
                None => 1,
                Some(n) => match n.parse::<u32>() {
                    Ok(n) if (1..=MAX_JOBS_PAGE).contains(&n) => n,
                    _ => {
                        return Err(GrammarError::BadOption {
                            option: "page".into(),
                            reason: format!(
                                "a number from 1 to {MAX_JOBS_PAGE}, not \"{}\"",
                                crate::terminal::excerpt(n)
                            ),
                        });
                    }
                },
            };
            Ok(ChatCommand::Jobs { mine, page })
        }
        "output" => match texts.as_slice() {
            [id] => Ok(ChatCommand::Output {
                id: id.to_string(),
                host: None,
            }),
            [id, host] => Ok(ChatCommand::Output {
                id: id.to_string(),
                host: Some(host.to_string()),
            }),
            _ => Err(GrammarError::Usage("output <id> [host]")),
        },
        "cancel" => one("cancel <id>").map(ChatCommand::Cancel),
        "approve" => one("approve <id>").map(ChatCommand::Approve),
        "deny" => match texts.split_first() {
            Some((id, reason)) => Ok(ChatCommand::Deny {
                id: id.to_string(),
                reason: (!reason.is_empty()).then(|| reason.join(" ")),
            }),
            None => Err(GrammarError::Usage("deny <id> [reason]")),
        },
        "agents" => checked_selector(joined()).map(ChatCommand::Agents),
        "status" => checked_selector(joined()).map(ChatCommand::Status),
        "health" => match texts.as_slice() {
            [] => Ok(ChatCommand::Health(None)),
            [s] => Ok(ChatCommand::Health(Some(s.to_string()))),
            _ => Err(GrammarError::Usage("health [service]")),
        },
        "silence" => match texts.as_slice() {
            [service, "off"] => Ok(ChatCommand::Silence {
                service: service.to_string(),
                for_: None,
                reason: None,
            }),
            [service, d, reason @ ..] => {
                let for_ = parse_duration(d).map_err(|e| GrammarError::BadOption {
                    option: "duration".into(),
                    reason: e.to_string(),
                })?;
                if for_.is_zero() {
                    return Err(GrammarError::Usage(SILENCE_USAGE));
                }
                Ok(ChatCommand::Silence {
                    service: service.to_string(),
                    for_: Some(for_),
                    reason: (!reason.is_empty()).then(|| reason.join(" ")),
                })
            }
            _ => Err(GrammarError::Usage(SILENCE_USAGE)),
        },
        "audit" => joined()
            .map(ChatCommand::Audit)
            .ok_or(GrammarError::Usage("audit <query>")),
        "whoami" => none(ChatCommand::Whoami, "whoami"),
        "policy" => none(ChatCommand::Policy, "policy"),
        _ => Err(GrammarError::UnknownCommand(excerpt(&first.text))),
    }
}

fn checked_selector(s: Option<String>) -> Result<Option<String>, GrammarError> {
    if let Some(s) = &s {
        Selector::parse(s).map_err(|e| GrammarError::BadSelector(e.to_string()))?;
    }
    Ok(s)
}

fn is_option(w: &Word) -> bool {
    !w.quoted && w.text.starts_with("--")
}

fn parse_run(words: &[Word]) -> Result<RunRequest, GrammarError> {
    let Some(command) = words
        .first()
        .filter(|w| (w.text != "on" || w.quoted) && !is_option(w))
    else {
        return Err(GrammarError::Usage(RUN_USAGE));
    };
    // The last bare `on` separates arguments from the selector, so a quoted
    // "on" (or one before it) can still be an argument value.
    let on = words
        .iter()
        .rposition(|w| !w.quoted && w.text == "on")
        .filter(|i| *i > 0)
        .ok_or(GrammarError::MissingTarget)?;
    let args = words[1..on].iter().map(|w| w.text.clone()).collect();
    let after = &words[on + 1..];
    let split = after.iter().position(is_option).unwrap_or(after.len());
    let selector = after[..split]
        .iter()
        .map(|w| w.text.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    if selector.is_empty() {
        return Err(GrammarError::MissingTarget);
    }
    Selector::parse(&selector).map_err(|e| GrammarError::BadSelector(e.to_string()))?;
    let options = parse_options(&after[split..])?;
    Ok(RunRequest {
        command: command.text.clone(),
        args,
        selector,
        options,
    })
}

fn parse_options(words: &[Word]) -> Result<RunOptions, GrammarError> {
    let mut opts = RunOptions::default();
    let mut it = words.iter();
    let mut seen: Vec<String> = Vec::new();
    while let Some(w) = it.next() {
        if !is_option(w) {
            return Err(GrammarError::Unexpected(excerpt(&w.text)));
        }
        let (name, inline) = match w.text.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (w.text.as_str(), None),
        };
        let bad = |reason: String| GrammarError::BadOption {
            option: excerpt(name),
            reason,
        };
        if !matches!(
            name,
            "--batch" | "--max-errors" | "--canary" | "--timeout" | "--dry-run"
        ) {
            return Err(GrammarError::UnknownOption(excerpt(name)));
        }
        if seen.iter().any(|s| s == name) {
            return Err(bad("given twice".to_string()));
        }
        seen.push(name.to_string());
        if name == "--dry-run" {
            if inline.is_some() {
                return Err(bad("takes no value".to_string()));
            }
            opts.dry_run = true;
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None => it
                .next()
                .filter(|v| !is_option(v))
                .map(|v| v.text.clone())
                .ok_or_else(|| bad("needs a value".to_string()))?,
        };
        match name {
            "--batch" => {
                let l = parse_limit(&value).map_err(bad)?;
                if l == Limit::Count(0) {
                    return Err(bad("must be at least 1".to_string()));
                }
                opts.batch = Some(l);
            }
            "--max-errors" => opts.max_errors = Some(parse_limit(&value).map_err(bad)?),
            "--canary" => match value.parse::<u32>() {
                Ok(n) if n >= 1 => opts.canary = Some(n),
                _ => {
                    return Err(bad(format!(
                        "expected a number of hosts >= 1, got `{}`",
                        excerpt(&value)
                    )));
                }
            },
            _ => {
                opts.timeout = Some(parse_job_timeout(&value).map_err(bad)?);
            }
        }
    }
    Ok(opts)
}

/// Parses `5` or `25%` (1..=100).
pub fn parse_limit(s: &str) -> Result<Limit, String> {
    let err = || {
        format!(
            "expected a count such as 5 or a percentage such as 25%, got `{}`",
            excerpt(s)
        )
    };
    match s.strip_suffix('%') {
        Some(p) => match p.parse::<u8>() {
            Ok(n) if (1..=100).contains(&n) => Ok(Limit::Percent(n)),
            _ => Err(err()),
        },
        None => s.parse::<u32>().map(Limit::Count).map_err(|_| err()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(command: &str, args: &[&str], selector: &str, options: RunOptions) -> ChatCommand {
        ChatCommand::Run(RunRequest {
            command: command.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
            selector: selector.to_string(),
            options,
        })
    }

    fn check(input: &str, expected: ChatCommand) {
        assert_eq!(parse(input), Ok(expected), "parse({input:?})");
    }

    fn check_err(input: &str, part: &str) {
        match parse(input) {
            Ok(c) => panic!("parse({input:?}) = {c:?}, expected an error containing {part:?}"),
            Err(e) => assert!(e.to_string().contains(part), "parse({input:?}): {e}"),
        }
    }

    fn s(x: &str) -> Option<String> {
        Some(x.to_string())
    }

    #[test]
    fn simple_commands() {
        use ChatCommand::*;
        check("help", Help(None));
        check("HELP restart", Help(s("restart")));
        check("job 0189", Job("0189".into()));
        check(
            "jobs",
            Jobs {
                mine: false,
                page: 1,
            },
        );
        check(
            "jobs mine",
            Jobs {
                mine: true,
                page: 1,
            },
        );
        check(
            "jobs mine page 3",
            Jobs {
                mine: true,
                page: 3,
            },
        );
        check(
            "jobs page 50",
            Jobs {
                mine: false,
                page: 50,
            },
        );
        for bad in [
            "jobs page 0",
            "jobs page 51",
            "jobs page x",
            "jobs page",
            "jobs 2",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        check(
            "output 0189",
            Output {
                id: "0189".into(),
                host: None,
            },
        );
        check(
            "output 0189 web-1",
            Output {
                id: "0189".into(),
                host: s("web-1"),
            },
        );
        check("cancel 0189", Cancel("0189".into()));
        check("approve 0189", Approve("0189".into()));
        check(
            "deny 0189",
            Deny {
                id: "0189".into(),
                reason: None,
            },
        );
        check(
            "deny 0189 not during  the freeze",
            Deny {
                id: "0189".into(),
                reason: s("not during the freeze"),
            },
        );
        check("agents", Agents(None));
        check("agents role in (web,api)", Agents(s("role in (web,api)")));
        check("status env=prod", Status(s("env=prod")));
        check("health", Health(None));
        check("health api", Health(s("api")));
        check(
            "silence api 1h deploy in progress",
            Silence {
                service: "api".into(),
                for_: Some(Duration::from_secs(3600)),
                reason: s("deploy in progress"),
            },
        );
        check(
            "silence api off",
            Silence {
                service: "api".into(),
                for_: None,
                reason: None,
            },
        );
        check("audit restart by alice", Audit("restart by alice".into()));
        check("whoami", Whoami);
        check("policy", Policy);
    }

    #[test]
    fn run_commands() {
        let d = RunOptions::default;
        check("run uptime on all", run("uptime", &[], "all", d()));
        check(
            "run restart nginx.service on role=web",
            run("restart", &["nginx.service"], "role=web", d()),
        );
        check(
            "run restart nginx on role in (web,api)",
            run("restart", &["nginx"], "role in (web,api)", d()),
        );
        check("run echo on on all", run("echo", &["on"], "all", d()));
        check(r#"run echo "on" on all"#, run("echo", &["on"], "all", d()));
        check(
            r#"run echo "two words" 'single q' on name=web-*"#,
            run("echo", &["two words", "single q"], "name=web-*", d()),
        );
        check(
            r#"run echo "a \"quoted\" \\ b" on all"#,
            run("echo", &[r#"a "quoted" \ b"#], "all", d()),
        );
        check(
            "run echo “smart quotes” on all",
            run("echo", &["smart quotes"], "all", d()),
        );
        check("run echo don't on all", run("echo", &["don't"], "all", d()));
        check(
            "run echo $(touch X) `id` ; on all",
            run("echo", &["$(touch", "X)", "`id`", ";"], "all", d()),
        );
        check(
            "run grep --verbose on all",
            run("grep", &["--verbose"], "all", d()),
        );
        check(
            "run restart nginx on role=web --batch 2 --max-errors 10% --canary 1 --timeout 5m --dry-run",
            run(
                "restart",
                &["nginx"],
                "role=web",
                RunOptions {
                    batch: Some(Limit::Count(2)),
                    max_errors: Some(Limit::Percent(10)),
                    canary: Some(1),
                    timeout: Some(Duration::from_secs(300)),
                    dry_run: true,
                },
            ),
        );
        check(
            "run uptime on all --batch=25% --max-errors 0",
            run(
                "uptime",
                &[],
                "all",
                RunOptions {
                    batch: Some(Limit::Percent(25)),
                    max_errors: Some(Limit::Count(0)),
                    ..d()
                },
            ),
        );
    }

    #[test]
    fn errors() {
        check_err("", "empty command");
        check_err("silence api", "silence <service> <duration>");
        check_err("silence api soon", "duration");
        check_err("silence api 0s", "silence <service> <duration>");
        // Integrations' verbs are not the core's: the gateway looks them up
        // among its registered commands.
        check_err("query up", "unknown command `query`; try `help`");
        check_err("oncall", "unknown command `oncall`; try `help`");
        check_err("   ", "empty command");
        check_err("foo", "unknown command `foo`; try `help`");
        check_err("run", "usage: run <command>");
        check_err("run on all", "usage: run <command>");
        check_err(
            "run uptime",
            "a target is required: run <command> [args] on <selector>",
        );
        check_err(r#"run uptime "on" all"#, "a target is required");
        check_err("run uptime on", "a target is required");
        check_err("run uptime on --dry-run", "a target is required");
        check_err("run uptime on role=web*", "globs are only allowed");
        check_err("run uptime on role in (web", "unbalanced");
        check_err("run uptime on all --force", "unknown option `--force`");
        check_err(
            "run uptime on all --batch",
            "option `--batch`: needs a value",
        );
        check_err("run uptime on all --batch 0", "must be at least 1");
        check_err("run uptime on all --batch 101%", "percentage");
        check_err("run uptime on all --batch 0%", "percentage");
        check_err("run uptime on all --batch x", "expected a count");
        check_err("run uptime on all --canary 0", "expected a number of hosts");
        check_err("run uptime on all --timeout 3w", "invalid duration");
        check_err(
            "run uptime on all --timeout 0s",
            "option `--timeout`: must be at least 1s",
        );
        check_err(
            "run uptime on all --timeout 500ms",
            "option `--timeout`: must be at least 1s (a job's timeout is whole seconds), got 500ms",
        );
        check_err(
            "run uptime on all --timeout=1500ms",
            "option `--timeout`: must be whole seconds",
        );
        check_err("run uptime on all --dry-run --dry-run", "given twice");
        check_err("run uptime on all --dry-run=yes", "takes no value");
        check_err(
            "run uptime on all --dry-run extra",
            "unexpected `extra` after the options",
        );
        check_err(r#"run echo "unterminated on all"#, "unterminated quote");
        check_err("run echo 'x on all", "unterminated quote");
        check_err("job", "usage: job <id>");
        check_err("job a b", "usage: job <id>");
        check_err("jobs yours", "usage: jobs [mine]");
        check_err("output", "usage: output");
        check_err("deny", "usage: deny");
        check_err("audit", "usage: audit");
        check_err("whoami now", "usage: whoami");
        check_err("agents role=web*", "globs");
        check_err("help a b", "usage: help");
    }

    #[test]
    fn every_verb_has_help_and_help_names_exactly_the_verbs() {
        for v in VERBS {
            // A verb parses (maybe with a usage error), never as unknown.
            if let Err(e) = parse(v.verb) {
                assert!(
                    !matches!(e, GrammarError::UnknownCommand(_)),
                    "{}: {e}",
                    v.verb
                );
            }
            assert!(v.usage.starts_with(v.verb), "{v:?}");
            assert!(!v.about.is_empty(), "{v:?}");
        }
        let run = verb_help("run").expect("run has help");
        for option in [
            "--batch",
            "--max-errors",
            "--canary",
            "--timeout",
            "--dry-run",
        ] {
            assert!(run.usage.contains(option), "{option}");
            assert!(
                run.details.iter().any(|d| d.starts_with(option)),
                "{option}"
            );
        }
        assert_eq!(verb_help("reboot"), None);
    }

    #[test]
    fn errors_quote_a_bounded_escaped_excerpt_of_the_input() {
        let huge = "x".repeat(100_000);
        for input in [
            format!("{huge} now"),
            format!("run uptime on all --{huge}"),
            format!("run uptime on all --batch {huge}"),
            format!("run uptime on all --canary {huge}"),
            format!("run uptime on all --timeout {huge}"),
            format!("run uptime on all --dry-run {huge}"),
            format!("run uptime on role={huge}!"),
            format!("run uptime on {huge}("),
            format!("run uptime on k in ({huge}"),
            format!("agents {huge}!"),
            format!("silence web {huge}"),
        ] {
            let e = parse(&input).expect_err(&input[..40]).to_string();
            assert!(e.chars().count() < 400, "{} chars: {}", e.len(), &e[..200]);
            assert!(e.contains(&format!("{}…", "x".repeat(50))), "{e}");
        }
        let e = parse("nope`\x1b[2J\u{202e}")
            .expect_err("not a verb")
            .to_string();
        assert_eq!(e, "unknown command `nope'\\x1b[2J\\u{202e}`; try `help`");
    }

    #[test]
    fn addressing() {
        for (text, direct, expected) in [
            ("!run uptime on all", false, Some("run uptime on all")),
            ("  ! help ", false, Some("help")),
            ("@fleetcmd help", false, Some("help")),
            ("@FLEETCMD: help", false, Some("help")),
            ("@fleetcmd", false, Some("")),
            ("fleetcmd: help", false, Some("help")),
            ("FleetCmd, help", false, Some("help")),
            ("fleetcmd help", false, None),
            ("@fleetcmdx help", false, None),
            ("fleetcmdx: help", false, None),
            ("hello", false, None),
            ("hello", true, Some("hello")),
            (" !jobs", true, Some("jobs")),
            ("@fleetcmd jobs", true, Some("jobs")),
            ("é", false, None),
        ] {
            assert_eq!(
                addressed(text, "fleetcmd", direct),
                expected,
                "{text:?} direct={direct}"
            );
        }
    }
}
