//! Nagios plugin semantics, as pure functions: the exit-code
//! mapping, the output format (summary, long output, performance data) and
//! threshold ranges, following the Monitoring Plugins Development
//! Guidelines. The agent runs plugins and built-in checks; what their output
//! and figures mean is decided here.
//!
//! ```
//! use fleetcmd_core::nagios::{CheckState, parse_output, state_from_exit};
//! let out = parse_output("DISK OK - free space: / 3326 MB (56%) | /=2643MB;5948;5958;0;5968\n");
//! assert_eq!(out.summary, "DISK OK - free space: / 3326 MB (56%)");
//! assert_eq!(out.perfdata[0].label, "/");
//! assert_eq!(out.perfdata[0].unit, "MB");
//! assert_eq!(state_from_exit(Some(2)), CheckState::Critical);
//! ```

use std::fmt;

/// The state of a check, as in Nagios: exit 0/1/2/3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CheckState {
    Ok,
    Warning,
    Critical,
    Unknown,
}

impl CheckState {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckState::Ok => "OK",
            CheckState::Warning => "WARNING",
            CheckState::Critical => "CRITICAL",
            CheckState::Unknown => "UNKNOWN",
        }
    }
}

impl fmt::Display for CheckState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Maps a plugin's exit status to its state: 0/1/2/3 are OK, WARNING,
/// CRITICAL, UNKNOWN; any other status, and `None` (killed by a signal, or
/// no status at all), is UNKNOWN: a plugin that crashed says nothing about
/// the service.
pub fn state_from_exit(code: Option<i32>) -> CheckState {
    match code {
        Some(0) => CheckState::Ok,
        Some(1) => CheckState::Warning,
        Some(2) => CheckState::Critical,
        _ => CheckState::Unknown,
    }
}

/// One performance data item: `'label'=value[UOM];[warn];[crit];[min];[max]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PerfData {
    pub label: String,
    pub value: f64,
    /// `""`, `s`, `ms`, `us`, `%`, `B`, `KB`, `MB`, `GB`, `TB`, `c`, or
    /// whatever letters the plugin wrote (kept, not judged).
    pub unit: String,
    /// Threshold ranges verbatim; empty when not given.
    pub warn: String,
    pub crit: String,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

/// A perfdata item that was skipped, and why; the other items are kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("perfdata item {item:?}: {reason}")]
pub struct PerfDataError {
    /// The item as written (truncated to 64 characters).
    pub item: String,
    pub reason: String,
}

/// A plugin's output, taken apart.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PluginOutput {
    /// The first line, before any `|`, trimmed.
    pub summary: String,
    /// The lines after the first, before the perfdata that follows a `|`.
    pub long_output: Vec<String>,
    pub perfdata: Vec<PerfData>,
    /// Items that could not be read.
    pub errors: Vec<PerfDataError>,
}

/// Parses plugin output as the guidelines lay it out:
///
/// ```text
/// TEXT OUTPUT | OPTIONAL PERFDATA
/// LONG TEXT LINE 1
/// LONG TEXT LINE N | PERFDATA LINE 2
/// PERFDATA LINE 3
/// ```
///
/// Perfdata comes from the first line after its `|`, and from everything
/// after the first `|` in the later lines (that line's rest and all lines
/// after it).
pub fn parse_output(text: &str) -> PluginOutput {
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("");
    let (summary, first_perf) = match first.split_once('|') {
        Some((s, p)) => (s, p),
        None => (first, ""),
    };
    let mut out = PluginOutput {
        summary: summary.trim().to_owned(),
        ..PluginOutput::default()
    };
    let mut perf_text = String::from(first_perf);
    let mut in_perf = false;
    for line in lines {
        if in_perf {
            perf_text.push(' ');
            perf_text.push_str(line);
        } else if let Some((text, perf)) = line.split_once('|') {
            if !text.trim().is_empty() {
                out.long_output.push(text.trim_end().to_owned());
            }
            perf_text.push(' ');
            perf_text.push_str(perf);
            in_perf = true;
        } else {
            out.long_output.push(line.trim_end().to_owned());
        }
    }
    let (perfdata, errors) = parse_perfdata(&perf_text);
    out.perfdata = perfdata;
    out.errors = errors;
    out
}

/// Parses whitespace-separated perfdata items; malformed items are
/// returned as errors and the rest kept.
pub fn parse_perfdata(text: &str) -> (Vec<PerfData>, Vec<PerfDataError>) {
    let mut items = Vec::new();
    let mut errors = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        // The label: quoted (may hold spaces, `=`, and `''` for a quote) or
        // up to the `=`.
        let mut label = String::new();
        let mut bad: Option<&str> = None;
        if chars[i] == '\'' {
            i += 1;
            let mut closed = false;
            while i < chars.len() {
                if chars[i] == '\'' {
                    if chars.get(i + 1) == Some(&'\'') {
                        label.push('\'');
                        i += 2;
                        continue;
                    }
                    i += 1;
                    closed = true;
                    break;
                }
                label.push(chars[i]);
                i += 1;
            }
            if !closed {
                bad = Some("unterminated quote in the label");
            } else if chars.get(i) != Some(&'=') {
                bad = Some("expected '=' after the label");
            }
        } else {
            while i < chars.len() && chars[i] != '=' && !chars[i].is_whitespace() {
                label.push(chars[i]);
                i += 1;
            }
            if chars.get(i) != Some(&'=') {
                bad = Some("expected label=value");
            }
        }
        // The rest of the item runs to the next whitespace.
        let value_start = if bad.is_none() { i + 1 } else { i };
        let mut end = value_start;
        while end < chars.len() && !chars[end].is_whitespace() {
            end += 1;
        }
        let item: String = chars[start..end].iter().collect();
        i = end;
        let result = match bad {
            Some(reason) => Err(reason.to_owned()),
            None if label.is_empty() => Err("empty label".to_owned()),
            None => {
                let rest: String = chars[value_start.min(end)..end].iter().collect();
                parse_item_fields(label, &rest)
            }
        };
        match result {
            Ok(p) => items.push(p),
            Err(reason) => errors.push(PerfDataError {
                item: item.chars().take(64).collect(),
                reason,
            }),
        }
    }
    (items, errors)
}

fn parse_item_fields(label: String, rest: &str) -> Result<PerfData, String> {
    let fields: Vec<&str> = rest.split(';').collect();
    if fields.len() > 5 {
        return Err(format!(
            "{} fields, at most 5 (value;warn;crit;min;max)",
            fields.len()
        ));
    }
    let raw_value = fields[0];
    if raw_value == "U" {
        return Err("value undetermined (U)".to_owned());
    }
    let split = raw_value
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+')))
        .unwrap_or(raw_value.len());
    let (number, unit) = raw_value.split_at(split);
    let value =
        parse_number(number).ok_or_else(|| format!("value {raw_value:?} is not a number"))?;
    if unit.len() > 8 || !unit.chars().all(|c| c.is_ascii_alphabetic() || c == '%') {
        return Err(format!("unit {unit:?} is not a unit of measurement"));
    }
    let field = |n: usize| fields.get(n).copied().unwrap_or("").trim();
    let (warn, crit) = (field(1), field(2));
    for (name, range) in [("warn", warn), ("crit", crit)] {
        if !range.is_empty() {
            Range::parse(range).map_err(|e| format!("{name}: {e}"))?;
        }
    }
    let bound = |name: &str, s: &str| -> Result<Option<f64>, String> {
        if s.is_empty() {
            return Ok(None);
        }
        parse_number(s)
            .map(Some)
            .ok_or_else(|| format!("{name} {s:?} is not a number"))
    };
    Ok(PerfData {
        label,
        value,
        unit: unit.to_owned(),
        warn: warn.to_owned(),
        crit: crit.to_owned(),
        min: bound("min", field(3))?,
        max: bound("max", field(4))?,
    })
}

/// A finite decimal number (no `inf`, `nan` or exponents, which plugins do
/// not write and which would read as units).
fn parse_number(s: &str) -> Option<f64> {
    if s.is_empty()
        || !s
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+'))
    {
        return None;
    }
    s.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// A threshold range in Nagios syntax: `10` (alert outside 0..10), `10:`
/// (below 10), `~:10` (above 10), `10:20` (outside 10..20), `@10:20`
/// (inside 10..20, inclusive).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    /// `f64::NEG_INFINITY` for `~`.
    pub start: f64,
    /// `f64::INFINITY` when omitted after the `:`.
    pub end: f64,
    /// `@`: alert when inside the range instead of outside.
    pub inside: bool,
}

/// Why a range could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("range {0:?}: empty")]
    Empty(String),
    #[error("range {0:?}: {1:?} is not a number")]
    NotANumber(String, String),
    #[error("range {0:?}: start is greater than end")]
    StartAfterEnd(String),
}

impl Range {
    /// ```
    /// use fleetcmd_core::nagios::Range;
    /// let r = Range::parse("10:20").unwrap();
    /// assert!(r.alerts(9.0) && !r.alerts(15.0) && r.alerts(21.0));
    /// ```
    pub fn parse(text: &str) -> Result<Range, RangeError> {
        let s = text.trim();
        let (inside, body) = match s.strip_prefix('@') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        if body.is_empty() {
            return Err(RangeError::Empty(text.to_owned()));
        }
        let number = |n: &str| {
            parse_number(n).ok_or_else(|| RangeError::NotANumber(text.to_owned(), n.to_owned()))
        };
        let (start, end) = match body.split_once(':') {
            None => (0.0, number(body)?),
            Some((a, b)) => {
                let start = match a {
                    "~" => f64::NEG_INFINITY,
                    "" => 0.0,
                    a => number(a)?,
                };
                let end = if b.is_empty() {
                    f64::INFINITY
                } else {
                    number(b)?
                };
                (start, end)
            }
        };
        if start > end {
            return Err(RangeError::StartAfterEnd(text.to_owned()));
        }
        Ok(Range { start, end, inside })
    }

    /// True when `value` should raise an alert: outside the range (ends
    /// inclusive), or inside it for `@` ranges.
    pub fn alerts(&self, value: f64) -> bool {
        let within = self.start <= value && value <= self.end;
        within == self.inside
    }
}

/// WARNING and CRITICAL ranges of one figure; CRITICAL wins.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Thresholds {
    pub warn: Option<Range>,
    pub crit: Option<Range>,
}

impl Thresholds {
    pub fn evaluate(&self, value: f64) -> CheckState {
        if self.crit.is_some_and(|r| r.alerts(value)) {
            CheckState::Critical
        } else if self.warn.is_some_and(|r| r.alerts(value)) {
            CheckState::Warning
        } else {
            CheckState::Ok
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(
        label: &str,
        value: f64,
        unit: &str,
        rest: (&str, &str, Option<f64>, Option<f64>),
    ) -> PerfData {
        PerfData {
            label: label.to_owned(),
            value,
            unit: unit.to_owned(),
            warn: rest.0.to_owned(),
            crit: rest.1.to_owned(),
            min: rest.2,
            max: rest.3,
        }
    }

    const NONE: (&str, &str, Option<f64>, Option<f64>) = ("", "", None, None);

    #[test]
    fn exit_codes() {
        for (code, state) in [
            (Some(0), CheckState::Ok),
            (Some(1), CheckState::Warning),
            (Some(2), CheckState::Critical),
            (Some(3), CheckState::Unknown),
            (Some(4), CheckState::Unknown),
            (Some(127), CheckState::Unknown),
            (Some(-1), CheckState::Unknown),
            (None, CheckState::Unknown),
        ] {
            assert_eq!(state_from_exit(code), state, "{code:?}");
        }
    }

    fn check_output(text: &str, summary: &str, long: &[&str], perf: &[PerfData], errors: usize) {
        let out = parse_output(text);
        assert_eq!(out.summary, summary, "summary of {text:?}");
        assert_eq!(out.long_output, long, "long output of {text:?}");
        assert_eq!(out.perfdata, perf, "perfdata of {text:?}");
        assert_eq!(
            out.errors.len(),
            errors,
            "errors of {text:?}: {:?}",
            out.errors
        );
    }

    #[test]
    fn output_examples_from_the_guidelines() {
        // Case 1: one line, no perfdata.
        check_output(
            "DISK OK - free space: / 3326 MB (56%);",
            "DISK OK - free space: / 3326 MB (56%);",
            &[],
            &[],
            0,
        );
        // Case 2: one line with perfdata.
        check_output(
            "DISK OK - free space: / 3326 MB (56%); | /=2643MB;5948;5958;0;5968",
            "DISK OK - free space: / 3326 MB (56%);",
            &[],
            &[p(
                "/",
                2643.0,
                "MB",
                ("5948", "5958", Some(0.0), Some(5968.0)),
            )],
            0,
        );
        // Case 3: long output, perfdata on the first and later lines.
        check_output(
            "DISK OK - free space: / 3326 MB (56%); | /=2643MB;5948;5958;0;5968\n\
             / 15272 MB (77%);\n\
             /boot 68 MB (69%);\n\
             /home 69357 MB (27%);\n\
             /var/log 819 MB (84%); | /boot=68MB;88;93;0;98\n\
             /home=69357MB;253404;253409;0;253414 \n\
             /var/log=818MB;970;975;0;980\n",
            "DISK OK - free space: / 3326 MB (56%);",
            &[
                "/ 15272 MB (77%);",
                "/boot 68 MB (69%);",
                "/home 69357 MB (27%);",
                "/var/log 819 MB (84%);",
            ],
            &[
                p("/", 2643.0, "MB", ("5948", "5958", Some(0.0), Some(5968.0))),
                p("/boot", 68.0, "MB", ("88", "93", Some(0.0), Some(98.0))),
                p(
                    "/home",
                    69357.0,
                    "MB",
                    ("253404", "253409", Some(0.0), Some(253414.0)),
                ),
                p(
                    "/var/log",
                    818.0,
                    "MB",
                    ("970", "975", Some(0.0), Some(980.0)),
                ),
            ],
            0,
        );
        // check_http style: quoted-free labels, seconds and bytes.
        check_output(
            "HTTP OK: HTTP/1.1 200 OK - 612 bytes in 0.002 second response time |time=0.001829s;;;0.000000;10.000000 size=612B;;;0",
            "HTTP OK: HTTP/1.1 200 OK - 612 bytes in 0.002 second response time",
            &[],
            &[
                p("time", 0.001829, "s", ("", "", Some(0.0), Some(10.0))),
                p("size", 612.0, "B", ("", "", Some(0.0), None)),
            ],
            0,
        );
        // check_load: commas in labels are fine, ranges kept verbatim.
        check_output(
            "OK - load average: 0.05, 0.10, 0.09|load1=0.050;15.000;30.000;0; load5=0.100;10.000;25.000;0;",
            "OK - load average: 0.05, 0.10, 0.09",
            &[],
            &[
                p("load1", 0.05, "", ("15.000", "30.000", Some(0.0), None)),
                p("load5", 0.1, "", ("10.000", "25.000", Some(0.0), None)),
            ],
            0,
        );
    }

    #[test]
    fn output_edge_cases() {
        check_output("", "", &[], &[], 0);
        check_output("  OK  \n", "OK", &[], &[], 0);
        check_output("OK |", "OK", &[], &[], 0);
        check_output("OK\nmore\n\nlines", "OK", &["more", "", "lines"], &[], 0);
        // A `|` in a later line starts perfdata for the rest of the output.
        check_output(
            "OK\ndetail | a=1\nb=2 c=3",
            "OK",
            &["detail"],
            &[
                p("a", 1.0, "", NONE),
                p("b", 2.0, "", NONE),
                p("c", 3.0, "", NONE),
            ],
            0,
        );
        // Malformed items are reported; good ones around them are kept.
        check_output(
            "OK | a=1 junk b=x c=2s d=U e=3;4;5;6;7;8 f=4 'g=5",
            "OK",
            &[],
            &[
                p("a", 1.0, "", NONE),
                p("c", 2.0, "s", NONE),
                p("f", 4.0, "", NONE),
            ],
            5,
        );
    }

    fn check_perf(text: &str, expected: Result<PerfData, &str>) {
        let (items, errors) = parse_perfdata(text);
        match expected {
            Ok(item) => {
                assert_eq!(errors, [], "{text:?}");
                assert_eq!(items, [item], "{text:?}");
            }
            Err(reason) => {
                assert_eq!(items, [], "{text:?}");
                assert_eq!(errors.len(), 1, "{text:?}");
                assert!(
                    errors[0].reason.contains(reason),
                    "{text:?}: {:?}",
                    errors[0]
                );
                assert!(
                    errors[0].to_string().contains(&errors[0].item),
                    "error names the item"
                );
            }
        }
    }

    #[test]
    fn perfdata_items() {
        check_perf("a=1", Ok(p("a", 1.0, "", NONE)));
        check_perf("a=-1.5", Ok(p("a", -1.5, "", NONE)));
        check_perf(
            "'with space'=10%;80;90",
            Ok(p("with space", 10.0, "%", ("80", "90", None, None))),
        );
        check_perf("'it''s'=1c", Ok(p("it's", 1.0, "c", NONE)));
        check_perf("'a=b'=2", Ok(p("a=b", 2.0, "", NONE)));
        check_perf(
            "t=0.5ms;;;0;",
            Ok(p("t", 0.5, "ms", ("", "", Some(0.0), None))),
        );
        check_perf(
            "t=1us;@10:20;~:30",
            Ok(p("t", 1.0, "us", ("@10:20", "~:30", None, None))),
        );
        check_perf("b=1KB;;", Ok(p("b", 1.0, "KB", NONE)));
        check_perf("x=5;;;;", Ok(p("x", 5.0, "", NONE)));
        check_perf("x", Err("expected label=value"));
        check_perf("=1", Err("empty label"));
        check_perf("''=1", Err("empty label"));
        check_perf("x=", Err("not a number"));
        check_perf("x=abc", Err("not a number"));
        check_perf("x=U", Err("undetermined"));
        check_perf("x=1.2.3", Err("not a number"));
        check_perf("x=1s;abc", Err("warn"));
        check_perf("x=1s;;5:1", Err("crit"));
        check_perf("x=1;;;zero", Err("min"));
        check_perf("x=1;;;;big", Err("max"));
        check_perf("x=1;2;3;4;5;6", Err("at most 5"));
        check_perf("x=1verylongunit", Err("unit"));
        check_perf("x=1$", Err("unit"));
        check_perf("'open=1", Err("unterminated"));
        check_perf("'q'x=1", Err("expected '='"));
    }

    fn check_range(text: &str, alerts_at: &[f64], quiet_at: &[f64]) {
        let r = Range::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        for v in alerts_at {
            assert!(r.alerts(*v), "{text} should alert at {v}");
        }
        for v in quiet_at {
            assert!(!r.alerts(*v), "{text} should not alert at {v}");
        }
    }

    #[test]
    fn ranges_from_the_guidelines() {
        // "10": < 0 or > 10.
        check_range("10", &[-1.0, 10.1, 11.0], &[0.0, 5.0, 10.0]);
        // "10:": < 10.
        check_range("10:", &[9.9, -5.0], &[10.0, 1e9]);
        // "~:10": > 10.
        check_range("~:10", &[10.1, 1e9], &[10.0, -1e9]);
        // "10:20": < 10 or > 20.
        check_range("10:20", &[9.0, 21.0], &[10.0, 15.0, 20.0]);
        // "@10:20": 10 <= x <= 20.
        check_range("@10:20", &[10.0, 15.0, 20.0], &[9.9, 20.1]);
        check_range(":5", &[-1.0, 6.0], &[0.0, 5.0]);
        check_range("-5:-1", &[0.0, -6.0], &[-5.0, -1.0]);
        check_range("0.5", &[0.6], &[0.5]);
        check_range(" 80 ", &[80.5], &[80.0]);
    }

    #[test]
    fn bad_ranges_name_the_input() {
        for (text, expected) in [
            ("", RangeError::Empty(String::new())),
            ("@", RangeError::Empty("@".into())),
            ("abc", RangeError::NotANumber("abc".into(), "abc".into())),
            ("1:x", RangeError::NotANumber("1:x".into(), "x".into())),
            ("20:10", RangeError::StartAfterEnd("20:10".into())),
            ("80%", RangeError::NotANumber("80%".into(), "80%".into())),
            ("inf", RangeError::NotANumber("inf".into(), "inf".into())),
        ] {
            assert_eq!(Range::parse(text), Err(expected.clone()), "{text:?}");
        }
        assert!(
            Range::parse("20:10")
                .expect_err("start > end")
                .to_string()
                .contains("\"20:10\"")
        );
    }

    #[test]
    fn thresholds_critical_wins() {
        let t = Thresholds {
            warn: Range::parse("80").ok(),
            crit: Range::parse("90").ok(),
        };
        for (v, state) in [
            (50.0, CheckState::Ok),
            (80.0, CheckState::Ok),
            (85.0, CheckState::Warning),
            (95.0, CheckState::Critical),
        ] {
            assert_eq!(t.evaluate(v), state, "{v}");
        }
        assert_eq!(Thresholds::default().evaluate(1e9), CheckState::Ok);
        let only_crit = Thresholds {
            warn: None,
            crit: Range::parse("10:").ok(),
        };
        assert_eq!(only_crit.evaluate(5.0), CheckState::Critical);
    }
}
