//! Building the argv of an allow-listed command from its template and the
//! requested argument values (ARCHITECTURE.md invariant 7: no shell, ever).
//!
//! A `{name}` element is replaced by exactly one element holding the
//! value's canonical form — the value exactly as it was checked: values are
//! never split, re-parsed or interpreted, so shell metacharacters stay
//! literal text. Canonical forms: an `int` is written back in plain decimal
//! (`+1` and `007` reach argv as `1` and `7`, so a command never sees a sign
//! or base prefix the range check ignored); a `duration` is passed trimmed,
//! as parsed; every other kind is passed unchanged.
//!
//! Characters refused in every kind: NUL and control characters (always),
//! and — unless the argument says `allow_format_chars = true` — Unicode
//! format characters (bidirectional controls, zero-width characters, the
//! soft hyphen, BOM: category Cf), line and paragraph separators,
//! private-use characters and invisible fillers, which make chat and audit
//! lines show something other than what runs. Numbers are ASCII digits
//! only, and `pattern` regexes use ASCII classes (`\d` is `[0-9]`), see
//! [`compile_pattern`].

use std::collections::BTreeMap;

use crate::policy::{ArgKind, ArgSpec, CommandDef, valid_arg_name};
use crate::terminal::excerpt;

/// Why argument values were refused.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ArgError {
    #[error("`{command}` takes at most {max} argument(s), got {got}")]
    TooMany {
        command: String,
        max: usize,
        got: usize,
    },
    #[error("`{command}` has no argument `{arg}`")]
    Unknown { command: String, arg: String },
    #[error("argument `{arg}` of `{command}` is required")]
    Missing { command: String, arg: String },
    /// `command` is empty when the check ran outside a command ([`validate_arg`]).
    #[error("{}", invalid_message(command, arg, reason))]
    Invalid {
        command: String,
        arg: String,
        reason: String,
    },
}

fn invalid_message(command: &str, arg: &str, reason: &str) -> String {
    if command.is_empty() {
        format!("argument `{arg}`: {reason}")
    } else {
        format!("argument `{arg}` of `{command}`: {reason}")
    }
}

impl ArgError {
    fn in_command(self, name: &str) -> ArgError {
        match self {
            ArgError::Invalid { arg, reason, .. } => ArgError::Invalid {
                command: name.to_string(),
                arg,
                reason,
            },
            other => other,
        }
    }
}

/// The placeholder name if `elem` is exactly `{name}`.
pub(crate) fn whole_placeholder(elem: &str) -> Option<&str> {
    let inner = elem.strip_prefix('{')?.strip_suffix('}')?;
    valid_arg_name(inner).then_some(inner)
}

/// Every `{name}` occurring inside `elem`.
pub(crate) fn embedded_placeholders(elem: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = elem;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) if valid_arg_name(&after[..close]) => {
                out.push(&after[..close]);
                rest = &after[close + 1..];
            }
            _ => rest = after,
        }
    }
    out
}

impl CommandDef {
    /// Argument names in order of first appearance in argv: the order of
    /// positional chat and CLI arguments.
    pub fn positional(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for elem in self.argv.iter().skip(1) {
            if let Some(name) = whole_placeholder(elem)
                && self.args.contains_key(name)
                && !out.contains(&name)
            {
                out.push(name);
            }
        }
        out
    }
}

/// Maps positional values to argument names; missing trailing values are
/// left out so defaults apply later.
pub fn bind_positional(
    def: &CommandDef,
    values: &[String],
) -> Result<BTreeMap<String, String>, ArgError> {
    let names = def.positional();
    if values.len() > names.len() {
        return Err(ArgError::TooMany {
            command: def.name.clone(),
            max: names.len(),
            got: values.len(),
        });
    }
    Ok(names
        .iter()
        .zip(values)
        .map(|(n, v)| (n.to_string(), v.clone()))
        .collect())
}

/// A `path` argument with `prefixes` at one position of argv: the agent
/// opens it beneath `prefix` without following symbolic links and hands the
/// command the descriptor it opened, never the name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathArg {
    /// The argv element holding the path.
    pub index: usize,
    /// The argument's name.
    pub arg: String,
    /// The longest of the argument's `prefixes` the path is under (no
    /// trailing `/` except for `/` itself).
    pub prefix: String,
    /// The path below `prefix`, without a leading or trailing `/`; empty
    /// when the path is the prefix itself.
    pub beneath: String,
    /// Whether a missing file may be created (`create = true`).
    pub create: bool,
}

/// An argv with the path arguments the agent must resolve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuiltArgv {
    pub argv: Vec<String>,
    pub paths: Vec<PathArg>,
}

/// Builds the argv to execute: validates every value (applying defaults) and
/// replaces each `{name}` element by exactly one element, the value's
/// canonical form. The result always has `def.argv.len()` elements.
///
/// ```
/// # use std::collections::BTreeMap;
/// # use fleetcmd_core::{policy::Policy, argv::build_argv};
/// let policy = Policy::parse(r#"
/// version = 1
/// [commands.echo]
/// argv = ["/bin/echo", "{text}", "{n}"]
/// args.text = { kind = "text" }
/// args.n = { kind = "int" }
/// "#).unwrap();
/// let values = BTreeMap::from([
///     ("text".to_string(), "$(reboot); a b".to_string()),
///     ("n".to_string(), "+007".to_string()),
/// ]);
/// let argv = build_argv(policy.command("echo").unwrap(), &values).unwrap();
/// assert_eq!(argv, ["/bin/echo", "$(reboot); a b", "7"]);
/// ```
pub fn build_argv(
    def: &CommandDef,
    values: &BTreeMap<String, String>,
) -> Result<Vec<String>, ArgError> {
    build(def, values).map(|b| b.argv)
}

/// [`build_argv`] plus where its `path` arguments are (what the agent
/// resolves without following symbolic links).
pub fn build(def: &CommandDef, values: &BTreeMap<String, String>) -> Result<BuiltArgv, ArgError> {
    if let Some(unknown) = values.keys().find(|k| !def.args.contains_key(*k)) {
        return Err(ArgError::Unknown {
            command: def.name.clone(),
            arg: unknown.clone(),
        });
    }
    let mut resolved: BTreeMap<&str, (String, &ArgSpec)> = BTreeMap::new();
    for (name, spec) in &def.args {
        let value = match (values.get(name), &spec.default) {
            (Some(v), _) => v,
            (None, Some(d)) => d,
            (None, None) => {
                return Err(ArgError::Missing {
                    command: def.name.clone(),
                    arg: name.clone(),
                });
            }
        };
        let canonical = validate_arg(name, spec, value).map_err(|e| e.in_command(&def.name))?;
        resolved.insert(name, (canonical, spec));
    }
    let mut paths = Vec::new();
    let argv = def
        .argv
        .iter()
        .enumerate()
        .map(|(i, elem)| match whole_placeholder(elem) {
            Some(name) if i > 0 => {
                let (value, spec) = resolved.get(name).ok_or_else(|| ArgError::Missing {
                    command: def.name.clone(),
                    arg: name.to_string(),
                })?;
                if let ArgKind::Path { prefixes, create } = &spec.kind
                    && let Some((prefix, beneath)) = split_at_prefix(value, prefixes)
                {
                    paths.push(PathArg {
                        index: i,
                        arg: name.to_string(),
                        prefix,
                        beneath,
                        create: *create,
                    });
                }
                Ok(value.clone())
            }
            _ => Ok(elem.clone()),
        })
        .collect::<Result<Vec<String>, ArgError>>()?;
    Ok(BuiltArgv { argv, paths })
}

/// The longest prefix `path` is under, and the rest of it below that prefix.
fn split_at_prefix(path: &str, prefixes: &[String]) -> Option<(String, String)> {
    let prefix = prefixes
        .iter()
        .filter(|p| under_prefix(path, p))
        .max_by_key(|p| p.trim_end_matches('/').len())?;
    let dir = prefix.trim_end_matches('/');
    let rest = path[dir.len()..].trim_matches('/');
    let dir = if dir.is_empty() { "/" } else { dir };
    Some((dir.to_string(), rest.to_string()))
}

/// Characters refused unless `allow_format_chars`: the invisible and
/// formatting characters the terminal escaping also replaces.
pub(crate) use crate::terminal::is_format as is_format_char;

/// Compiles a `pattern` argument's regex as a full match, with ASCII
/// classes: `\d`, `\w`, `\s`, `\b` and case-insensitive matching cover
/// ASCII only (Unicode digits such as `٣` or `３` never match `\d`), and `.`
/// or a negated class matches any one byte of a non-ASCII character. A
/// pattern opts into Unicode classes explicitly with `(?u:...)`.
pub fn compile_pattern(source: &str) -> Result<regex::bytes::Regex, regex::Error> {
    regex::bytes::RegexBuilder::new(&format!("^(?:{source})$"))
        .unicode(false)
        .build()
}

/// Checks one value against its spec (the dash rule, the characters refused
/// in every kind, then the kind's validator) and returns its canonical form:
/// the exact string that reaches argv.
pub fn validate_arg(name: &str, spec: &ArgSpec, value: &str) -> Result<String, ArgError> {
    let fail = |reason: String| ArgError::Invalid {
        command: String::new(),
        arg: name.to_string(),
        reason,
    };
    if value.starts_with('-') && !spec.allow_dash {
        return Err(fail("value must not start with `-`".to_string()));
    }
    if value.contains('\0') {
        return Err(fail("value must not contain NUL".to_string()));
    }
    if value.chars().any(char::is_control) {
        return Err(fail("must not contain control characters".to_string()));
    }
    if !spec.allow_format_chars
        && let Some(c) = value.chars().find(|c| is_format_char(*c))
    {
        return Err(fail(format!(
            "must not contain invisible or formatting character U+{:04X} (the argument does not set `allow_format_chars`)",
            u32::from(c)
        )));
    }
    match &spec.kind {
        ArgKind::Text { max_len } => {
            if value.chars().count() > *max_len {
                return Err(fail(format!("longer than {max_len} characters")));
            }
        }
        ArgKind::Int { min, max } => {
            let digits = value.strip_prefix(['+', '-']).unwrap_or(value);
            // `i64::from_str` takes ASCII digits only; said here, not assumed.
            let n: i64 = if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                value.parse().ok()
            } else {
                None
            }
            .ok_or_else(|| fail(format!("\"{}\" is not an integer", excerpt(value))))?;
            if n < *min || n > *max {
                return Err(fail(format!("{n} is outside {min}..={max}")));
            }
            return Ok(n.to_string());
        }
        ArgKind::Enum { values } => {
            if !values.iter().any(|v| v == value) {
                return Err(fail(format!(
                    "\"{}\" is not one of {}",
                    excerpt(value),
                    values.join(", ")
                )));
            }
        }
        ArgKind::Pattern { regex, source } => {
            if !regex.is_match(value.as_bytes()) {
                return Err(fail(format!(
                    "\"{}\" does not match `{source}`",
                    excerpt(value)
                )));
            }
        }
        ArgKind::Hostname => {
            if !valid_hostname(value) {
                return Err(fail(format!(
                    "\"{}\" is not a valid host name",
                    excerpt(value)
                )));
            }
        }
        ArgKind::Path { prefixes, .. } => {
            if !normalized_absolute_path(value) {
                return Err(fail(format!(
                    "\"{}\" must be an absolute path without `..`, `.` or `//`",
                    excerpt(value)
                )));
            }
            if !prefixes.is_empty() && !prefixes.iter().any(|p| under_prefix(value, p)) {
                return Err(fail(format!(
                    "\"{}\" is not under {}",
                    excerpt(value),
                    prefixes.join(", ")
                )));
            }
        }
        ArgKind::Duration => {
            return crate::duration::canonical_duration(value).map_err(fail);
        }
    }
    Ok(value.to_string())
}

fn valid_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Absolute, and free of `..`, `.`, empty segments and control characters.
pub(crate) fn normalized_absolute_path(p: &str) -> bool {
    if !p.starts_with('/') || p.chars().any(char::is_control) {
        return false;
    }
    if p == "/" {
        return true;
    }
    let body = p.strip_suffix('/').unwrap_or(p);
    body[1..]
        .split('/')
        .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

fn under_prefix(path: &str, prefix: &str) -> bool {
    let prefix_dir = prefix.strip_suffix('/').unwrap_or(prefix);
    path == prefix
        || path == prefix_dir
        || path
            .strip_prefix(prefix_dir)
            .is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    const POLICY: &str = r#"
version = 1

[commands.echo]
argv = ["/bin/echo", "--", "{text}", "{text}"]
args.text = { kind = "text", max_len = 20 }

[commands.logs]
argv = ["/usr/bin/journalctl", "-u", "{unit}", "-n", "{lines}", "--no-pager"]
args.unit = { kind = "pattern", pattern = "^[a-z0-9@._-]+\\.service$" }
args.lines = { kind = "int", min = 1, max = 500, default = 50 }

[commands.grep]
argv = ["/bin/grep", "{pattern}", "{file}"]
args.pattern = { kind = "text", allow_dash = true }
args.file = { kind = "path", prefixes = ["/var/log"] }

[commands.ping]
argv = ["/bin/ping", "-c", "1", "-w", "{wait}", "{host}"]
args.host = { kind = "hostname" }
args.wait = { kind = "duration", default = "5s" }

[commands.restart]
argv = ["/usr/bin/systemctl", "restart", "{unit}"]
args.unit = { kind = "enum", values = ["nginx.service", "app.service"] }
"#;

    fn policy() -> Policy {
        Policy::parse(POLICY).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `expected` is the argv, or `Err(substring of the error)`.
    fn check(command: &str, args: &[(&str, &str)], expected: Result<&[&str], &str>) {
        let p = policy();
        let def = p.command(command).unwrap_or_else(|| panic!("no {command}"));
        let values: BTreeMap<String, String> = args
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let got = build_argv(def, &values);
        match (&got, expected) {
            (Ok(argv), Ok(want)) => {
                assert_eq!(argv, want, "{command} {args:?}");
                assert_eq!(argv.len(), def.argv.len());
            }
            (Err(e), Err(part)) => assert!(e.to_string().contains(part), "{command} {args:?}: {e}"),
            _ => panic!("{command} {args:?}: got {got:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn metacharacters_stay_one_verbatim_element() {
        for value in [
            "$(touch X)",
            "; touch X",
            "`touch X`",
            "a b",
            "a\"b'c",
            "|&>*",
            "{text}",
            "",
        ] {
            check(
                "echo",
                &[("text", value)],
                Ok(&["/bin/echo", "--", value, value]),
            );
        }
    }

    #[test]
    fn build_table() {
        check(
            "echo",
            &[("text", "-rf")],
            Err("argument `text` of `echo`: value must not start with `-`"),
        );
        check("echo", &[("text", "a\nb")], Err("control characters"));
        check("echo", &[("text", &"x".repeat(21))], Err("longer than 20"));
        check("echo", &[], Err("argument `text` of `echo` is required"));
        check(
            "echo",
            &[("text", "x"), ("other", "y")],
            Err("`echo` has no argument `other`"),
        );
        check(
            "logs",
            &[("unit", "nginx.service")],
            Ok(&[
                "/usr/bin/journalctl",
                "-u",
                "nginx.service",
                "-n",
                "50",
                "--no-pager",
            ]),
        );
        check(
            "logs",
            &[("unit", "nginx.service"), ("lines", "500")],
            Ok(&[
                "/usr/bin/journalctl",
                "-u",
                "nginx.service",
                "-n",
                "500",
                "--no-pager",
            ]),
        );
        check(
            "logs",
            &[("unit", "nginx.service"), ("lines", "501")],
            Err("outside 1..=500"),
        );
        check(
            "logs",
            &[("unit", "nginx.service"), ("lines", "0")],
            Err("outside"),
        );
        check(
            "logs",
            &[("unit", "nginx.service"), ("lines", "-1")],
            Err("must not start with `-`"),
        );
        check(
            "logs",
            &[("unit", "nginx.service"), ("lines", "1e3")],
            Err("not an integer"),
        );
        check(
            "logs",
            &[("unit", "nginx.service; rm")],
            Err("does not match"),
        );
        check(
            "logs",
            &[("unit", "xnginx.service\n")],
            Err("control characters"),
        );
        check(
            "grep",
            &[("pattern", "-v"), ("file", "/var/log/syslog")],
            Ok(&["/bin/grep", "-v", "/var/log/syslog"]),
        );
        check(
            "grep",
            &[("pattern", "x"), ("file", "/var/log/../../etc/shadow")],
            Err("without `..`"),
        );
        check(
            "grep",
            &[("pattern", "x"), ("file", "/var/log//x")],
            Err("without"),
        );
        check(
            "grep",
            &[("pattern", "x"), ("file", "/var/log/./x")],
            Err("without"),
        );
        check(
            "grep",
            &[("pattern", "x"), ("file", "var/log/x")],
            Err("absolute"),
        );
        check(
            "grep",
            &[("pattern", "x"), ("file", "/var/logs-evil/x")],
            Err("is not under /var/log"),
        );
        check(
            "grep",
            &[("pattern", "x"), ("file", "/etc/shadow")],
            Err("is not under"),
        );
        check(
            "ping",
            &[("host", "web-1.example.com")],
            Ok(&["/bin/ping", "-c", "1", "-w", "5s", "web-1.example.com"]),
        );
        check(
            "ping",
            &[("host", "-oProxy")],
            Err("must not start with `-`"),
        );
        check(
            "ping",
            &[("host", "bad_host")],
            Err("not a valid host name"),
        );
        check("ping", &[("host", "a.-b")], Err("not a valid host name"));
        check(
            "ping",
            &[("host", "h"), ("wait", "3w")],
            Err("invalid duration"),
        );
        check(
            "restart",
            &[("unit", "nginx.service")],
            Ok(&["/usr/bin/systemctl", "restart", "nginx.service"]),
        );
        check(
            "restart",
            &[("unit", "sshd.service")],
            Err("is not one of nginx.service, app.service"),
        );
    }

    /// `kind` is the TOML of one argument `v` of a command `c`; `expected`
    /// is the canonical value, or `Err(substring of the error)`.
    fn canon(kind: &str, value: &str, expected: Result<&str, &str>) {
        let text =
            format!("version = 1\n[commands.c]\nargv = [\"/bin/c\", \"{{v}}\"]\nargs.v = {kind}\n");
        let p = Policy::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let def = p.command("c").unwrap_or_else(|| panic!("c"));
        let got = build_argv(def, &BTreeMap::from([("v".to_string(), value.to_string())]));
        match (&got, expected) {
            (Ok(argv), Ok(want)) => assert_eq!(argv[1], want, "{kind} {value:?}"),
            (Err(e), Err(part)) => assert!(e.to_string().contains(part), "{kind} {value:?}: {e}"),
            _ => panic!("{kind} {value:?}: got {got:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn the_canonical_value_is_what_reaches_argv() {
        let int = r#"{ kind = "int", min = 0, max = 1000 }"#;
        let signed = r#"{ kind = "int", min = -10, max = 10, allow_dash = true }"#;
        let duration = r#"{ kind = "duration" }"#;
        for (kind, value, expected) in [
            // `tail -n +1` prints everything: `+1` never reaches argv as `+1`.
            (int, "+1", Ok("1")),
            (int, "007", Ok("7")),
            (int, "+0007", Ok("7")),
            (int, "0", Ok("0")),
            (int, "1000", Ok("1000")),
            (int, "000000000000000000000000000000000001", Ok("1")),
            (signed, "-0", Ok("0")),
            (signed, "-007", Ok("-7")),
            (signed, "+-1", Err("is not an integer")),
            (int, "++1", Err("is not an integer")),
            (int, "+", Err("is not an integer")),
            (int, "", Err("is not an integer")),
            (int, " 1", Err("is not an integer")),
            (int, "1 ", Err("is not an integer")),
            (int, "0x10", Err("is not an integer")),
            (int, "1_000", Err("is not an integer")),
            // Digits other than ASCII: Arabic-Indic, fullwidth, Devanagari.
            (int, "\u{663}", Err("is not an integer")),
            (int, "\u{ff11}", Err("is not an integer")),
            (int, "1\u{967}", Err("is not an integer")),
            (duration, "5s", Ok("5s")),
            (duration, " 5s ", Ok("5s")),
            (duration, "\u{3000}2m", Ok("2m")),
            // Leading zeros never reach argv (`010` is 8 to an octal reader).
            (duration, "0010s", Ok("10s")),
            (duration, "007", Ok("7")),
            (duration, "0s", Ok("0s")),
            (
                duration,
                "000000000000000000000000000000000000000000000000000000000001d",
                Ok("1d"),
            ),
            (duration, "\u{ff15}s", Err("invalid duration")),
            (duration, "5s\t", Err("control characters")),
        ] {
            canon(kind, value, expected);
        }
    }

    #[test]
    fn format_and_control_characters_are_refused_in_every_kind() {
        let kinds = [
            r#"{ kind = "text" }"#,
            r#"{ kind = "pattern", pattern = ".*" }"#,
            r#"{ kind = "pattern", pattern = "(?u:.*)" }"#,
            r#"{ kind = "path", prefixes = ["/var/log"] }"#,
            r#"{ kind = "enum", values = ["a\u202eb", "a\u200bb", "a\nb"] }"#,
        ];
        let hostile = [
            ("a\u{202e}b", "U+202E"), // right-to-left override
            ("a\u{202a}b", "U+202A"),
            ("a\u{2066}b", "U+2066"), // left-to-right isolate
            ("a\u{2069}b", "U+2069"),
            ("a\u{200b}b", "U+200B"), // zero-width space
            ("a\u{200d}b", "U+200D"),
            ("a\u{200e}b", "U+200E"),
            ("a\u{200f}b", "U+200F"),
            ("a\u{feff}b", "U+FEFF"),
            ("a\u{ad}b", "U+00AD"), // soft hyphen
            ("a\u{2060}b", "U+2060"),
            ("a\u{61c}b", "U+061C"),
            ("a\u{e0041}b", "U+E0041"), // tag character
            ("a\u{2028}b", "U+2028"),
            ("a\u{e000}b", "U+E000"),
            ("a\u{3164}b", "U+3164"),
            ("a\nb", "control characters"),
            ("a\rb", "control characters"),
            ("a\u{1b}[2Jb", "control characters"),
            ("a\u{85}b", "control characters"),
            ("a\0b", "NUL"),
        ];
        for kind in kinds {
            for (value, part) in hostile {
                let path_value;
                let value = if kind.contains("path") {
                    path_value = format!("/var/log/{value}");
                    &path_value
                } else {
                    value
                };
                canon(kind, value, Err(part));
            }
        }
        // Ordinary non-ASCII text stays allowed.
        canon(r#"{ kind = "text" }"#, "café 漢字 🙂", Ok("café 漢字 🙂"));
        canon(r#"{ kind = "text" }"#, "a\u{a0}b", Ok("a\u{a0}b"));
        // An argument that opts in lets format characters (not controls) through.
        let opted = r#"{ kind = "text", allow_format_chars = true }"#;
        canon(opted, "שלום\u{200f}!", Ok("שלום\u{200f}!"));
        canon(opted, "👩\u{200d}💻", Ok("👩\u{200d}💻"));
        canon(opted, "a\nb", Err("control characters"));
    }

    #[test]
    fn pattern_classes_are_ascii() {
        let digits = r#"{ kind = "pattern", pattern = "\\d+" }"#;
        let word = r#"{ kind = "pattern", pattern = "\\w+" }"#;
        let any = r#"{ kind = "pattern", pattern = "[a-z]+\\..+" }"#;
        let nocase = r#"{ kind = "pattern", pattern = "(?i)k" }"#;
        let literal = r#"{ kind = "pattern", pattern = "café" }"#;
        for (kind, value, expected) in [
            (digits, "123", Ok("123")),
            (digits, "\u{663}\u{664}", Err("does not match")),
            (digits, "\u{ff11}", Err("does not match")),
            (digits, "1\u{967}", Err("does not match")),
            (word, "ab_1", Ok("ab_1")),
            (word, "é", Err("does not match")),
            (any, "a.é", Ok("a.é")),
            (any, "a.b\tc", Err("control characters")),
            (any, "a.b\u{202e}c", Err("U+202E")),
            (nocase, "K", Ok("K")),
            (nocase, "\u{212a}", Err("does not match")), // KELVIN SIGN
            (literal, "café", Ok("café")),
            (literal, "cafe", Err("does not match")),
        ] {
            canon(kind, value, expected);
        }
    }

    #[test]
    fn path_arguments_know_their_prefix() {
        let text = r#"version = 1
[commands.c]
argv = ["/bin/c", "{a}", "{b}", "{a}", "{free}"]
args.a = { kind = "path", prefixes = ["/var/log", "/var/log/app/"], create = true }
args.b = { kind = "path", prefixes = ["/"] }
args.free = { kind = "path" }
"#;
        let p = Policy::parse(text).unwrap_or_else(|e| panic!("{e}"));
        let def = p.command("c").unwrap_or_else(|| panic!("c"));
        let values = BTreeMap::from([
            ("a".to_string(), "/var/log/app/x/y.log".to_string()),
            ("b".to_string(), "/etc/".to_string()),
            ("free".to_string(), "/anything".to_string()),
        ]);
        let built = build(def, &values).unwrap_or_else(|e| panic!("{e}"));
        let a = |index| PathArg {
            index,
            arg: "a".into(),
            prefix: "/var/log/app".into(),
            beneath: "x/y.log".into(),
            create: true,
        };
        let b = PathArg {
            index: 2,
            arg: "b".into(),
            prefix: "/".into(),
            beneath: "etc".into(),
            create: false,
        };
        assert_eq!(built.paths, [a(1), b, a(3)]);
        assert_eq!(built.argv[4], "/anything");
        assert_eq!(
            split_at_prefix("/var/log", &["/var/log/".to_string()]),
            Some(("/var/log".to_string(), String::new()))
        );
    }

    #[test]
    fn positional_order_and_binding() {
        let p = policy();
        let logs = p.command("logs").unwrap_or_else(|| panic!("logs"));
        assert_eq!(logs.positional(), ["unit", "lines"]);
        let echo = p.command("echo").unwrap_or_else(|| panic!("echo"));
        assert_eq!(echo.positional(), ["text"]);
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let bound = bind_positional(logs, &s(&["a.service"]));
        assert_eq!(
            bound,
            Ok(BTreeMap::from([(
                "unit".to_string(),
                "a.service".to_string()
            )]))
        );
        let err = bind_positional(logs, &s(&["a", "b", "c"]))
            .expect_err("three values for two arguments");
        assert_eq!(err.to_string(), "`logs` takes at most 2 argument(s), got 3");
    }

    #[test]
    fn validate_arg_without_command() {
        let spec = ArgSpec {
            kind: ArgKind::Text { max_len: 5 },
            default: None,
            allow_dash: false,
            allow_format_chars: false,
        };
        assert_eq!(
            validate_arg("x", &spec, "-a").map_err(|e| e.to_string()),
            Err("argument `x`: value must not start with `-`".to_string())
        );
        assert_eq!(validate_arg("x", &spec, "abc"), Ok("abc".to_string()));
    }

    #[test]
    fn placeholders() {
        assert_eq!(whole_placeholder("{unit}"), Some("unit"));
        assert_eq!(whole_placeholder("{unit"), None);
        assert_eq!(whole_placeholder("{a b}"), None);
        assert_eq!(embedded_placeholders("--unit={unit}"), ["unit"]);
        assert_eq!(embedded_placeholders("{a}{b}"), ["a", "b"]);
        assert!(embedded_placeholders("{.foo} {}").is_empty());
    }
}

/// Property tests: for random templates and hostile values, `build_argv`
/// keeps the template's shape, puts each value verbatim into exactly one
/// element, leaves literals alone and applies the dash rule.
#[cfg(test)]
mod proptests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::build_argv;
    use crate::policy::{ArgKind, Policy};

    const NAMES: [&str; 4] = ["a", "unit", "_x", "n-2"];

    #[derive(Clone, Debug)]
    enum Elem {
        Literal(String),
        Placeholder(usize),
    }

    /// Literals never contain a `{name}`; some contain braces that are not placeholders.
    fn literal() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[^{}\\p{Cc}]{0,12}",
            1 => prop::sample::select(vec!["{}", "{.x}", "{a b}", "{", "}", "-", "--", "$(id)", "{9}"])
                .prop_map(str::to_string),
        ]
    }

    fn template() -> impl Strategy<Value = Vec<Elem>> {
        prop::collection::vec(
            prop_oneof![
                literal().prop_map(Elem::Literal),
                (0..NAMES.len()).prop_map(Elem::Placeholder),
            ],
            0..8,
        )
    }

    /// Shell metacharacters, quotes, blanks, unicode; plus arbitrary strings
    /// (control characters included, which must be refused).
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[-a-z $`;|&<>()*?'\"\\\\{}!#~=é漢🙂\u{a0}\u{2028}]{0,24}",
            2 => "\\PC{0,24}",
            1 => prop::sample::select(vec!["$(reboot)", "`id`", "; rm -rf /", "a | b", "-rf", "--", "-", "", "{a}", "  "])
                .prop_map(str::to_string),
            1 => any::<String>(),
        ]
    }

    fn toml_str(s: &str) -> String {
        toml::Value::String(s.to_string()).to_string()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        #[test]
        fn placeholders_are_replaced_verbatim(
            tmpl in template(),
            allow_dash in prop::collection::vec(any::<bool>(), NAMES.len()),
            max_len in 1usize..40,
            values in prop::collection::vec(value(), NAMES.len()),
        ) {
            let used: Vec<usize> = {
                let mut u: Vec<usize> = tmpl.iter().filter_map(|e| match e {
                    Elem::Placeholder(i) => Some(*i),
                    Elem::Literal(_) => None,
                }).collect();
                u.sort();
                u.dedup();
                u
            };
            let mut argv = vec!["\"/usr/bin/prog\"".to_string()];
            argv.extend(tmpl.iter().map(|e| match e {
                Elem::Literal(l) => toml_str(l),
                Elem::Placeholder(i) => toml_str(&format!("{{{}}}", NAMES[*i])),
            }));
            let mut text = format!("version = 1\n[commands.c]\nargv = [{}]\n", argv.join(", "));
            for &i in &used {
                text += &format!(
                    "args.{} = {{ kind = \"text\", max_len = {max_len}, allow_dash = {} }}\n",
                    toml_str(NAMES[i]),
                    allow_dash[i]
                );
            }
            let policy = Policy::parse(&text)
                .map_err(|e| TestCaseError::fail(format!("policy did not parse: {e}\n{text}")))?;
            let def = policy.command("c").ok_or_else(|| TestCaseError::fail("no command c"))?;
            let all_text = used.iter().all(|&i| def.args[NAMES[i]].kind == ArgKind::Text { max_len });
            prop_assert!(all_text);

            let given: BTreeMap<String, String> = used
                .iter()
                .map(|&i| (NAMES[i].to_string(), values[i].clone()))
                .collect();
            let refused: Vec<&str> = used
                .iter()
                .filter(|&&i| {
                    let v = &values[i];
                    (v.starts_with('-') && !allow_dash[i])
                        || v.chars().any(|c| c.is_control() || super::is_format_char(c))
                        || v.chars().count() > max_len
                })
                .map(|&i| NAMES[i])
                .collect();
            match build_argv(def, &given) {
                Ok(out) if refused.is_empty() => {
                    prop_assert_eq!(out.len(), tmpl.len() + 1);
                    prop_assert_eq!(out[0].as_str(), "/usr/bin/prog");
                    for (e, got) in tmpl.iter().zip(&out[1..]) {
                        match e {
                            Elem::Literal(l) => prop_assert_eq!(got, l),
                            Elem::Placeholder(i) => prop_assert_eq!(got, &values[*i]),
                        }
                    }
                }
                Err(e) if !refused.is_empty() => {
                    let msg = e.to_string();
                    let names_one = refused.iter().any(|n| msg.contains(&format!("argument `{n}` of `c`")));
                    prop_assert!(names_one, "{} should name one of {:?}", msg, refused);
                }
                got => prop_assert!(
                    false,
                    "template {:?} values {:?} allow_dash {:?} max_len {}: got {:?}, expected refusal of {:?}",
                    tmpl, given, allow_dash, max_len, got, refused
                ),
            }
        }

        /// A value that starts with `-` is refused exactly when `allow_dash` is off.
        #[test]
        fn dash_rule(rest in "\\PC{0,16}", allow_dash in any::<bool>()) {
            let text = format!(
                "version = 1\n[commands.c]\nargv = [\"/bin/c\", \"{{v}}\"]\nargs.v = {{ kind = \"text\", allow_dash = {allow_dash} }}\n"
            );
            let policy = Policy::parse(&text)
                .map_err(|e| TestCaseError::fail(format!("policy did not parse: {e}")))?;
            let def = policy.command("c").ok_or_else(|| TestCaseError::fail("no command c"))?;
            let value = format!("-{rest}");
            let got = build_argv(def, &BTreeMap::from([("v".to_string(), value.clone())]));
            if allow_dash && value.chars().any(super::is_format_char) {
                let msg = got.map_err(|e| e.to_string()).err().unwrap_or_default();
                prop_assert!(msg.contains("invisible or formatting character"), "{:?}: {}", value, msg);
            } else if allow_dash {
                prop_assert_eq!(got, Ok(vec!["/bin/c".to_string(), value]));
            } else {
                let msg = got.map_err(|e| e.to_string()).err().unwrap_or_default();
                prop_assert!(msg.contains("must not start with `-`"), "{:?}: {}", value, msg);
            }
        }
    }
}
