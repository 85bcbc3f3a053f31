//! What an agent reports about itself when it connects: version, host name,
//! facts and its narrowing of the allow-list. None of it grants anything —
//! selectors and `targets` rules match only the labels of the agent's
//! enrolment record — but it is stored, shown to operators and chat users,
//! and written to logs, so each field is checked (charset, length, count)
//! before the controller keeps it, and a report that fails is refused whole.
//!
//! ```
//! use fleetcmd_core::host::HostReport;
//! let facts = [("os".to_string(), "debian-12".to_string())].into();
//! let r = HostReport::new("1.4.0", "web-1.example", facts, vec!["uptime".into()])
//!     .expect("a plain report is accepted");
//! assert_eq!(r.facts["os"], "debian-12");
//! assert!(HostReport::new("1.4\x1b[2J", "", Default::default(), vec![]).is_err());
//! ```

use std::collections::BTreeMap;

/// Most facts one host may report.
pub const MAX_FACTS: usize = 64;
/// Most commands a host's allow-list narrowing may name.
pub const MAX_ALLOW: usize = 512;
const MAX_VERSION: usize = 64;
const MAX_HOSTNAME: usize = 253;

/// A validated agent `Hello`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostReport {
    pub version: String,
    pub hostname: String,
    /// Self-reported, never granting: shown, not selectable.
    pub facts: BTreeMap<String, String>,
    pub allow: Vec<String>,
}

/// Which field of a host report was refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("hello {field}: {reason}")]
pub struct HostReportError {
    pub field: &'static str,
    pub reason: String,
}

fn err(field: &'static str, reason: impl Into<String>) -> HostReportError {
    HostReportError {
        field,
        reason: reason.into(),
    }
}

/// At most `max` bytes from a plain ASCII set; an empty value is allowed
/// (older agents send no host name).
fn plain(field: &'static str, s: &str, max: usize, extra: &[u8]) -> Result<(), HostReportError> {
    if s.len() > max {
        return Err(err(field, format!("{} bytes, at most {max}", s.len())));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || (c.is_ascii() && extra.contains(&(*c as u8)))))
    {
        return Err(err(field, format!("character {c:?} is not allowed")));
    }
    Ok(())
}

impl HostReport {
    /// Checks every field: version (64 bytes of letters, digits, `.+-_~`),
    /// host name (253 bytes of letters, digits, `.-_`), facts (at most 64,
    /// keys and values as label keys and values) and allow-list entries
    /// (at most 512 command names).
    pub fn new(
        version: &str,
        hostname: &str,
        facts: BTreeMap<String, String>,
        allow: Vec<String>,
    ) -> Result<HostReport, HostReportError> {
        plain("version", version, MAX_VERSION, b".+-_~")?;
        plain("hostname", hostname, MAX_HOSTNAME, b".-_")?;
        if facts.len() > MAX_FACTS {
            return Err(err(
                "facts",
                format!("{} facts, at most {MAX_FACTS}", facts.len()),
            ));
        }
        for (k, v) in &facts {
            if !crate::selector::valid_key(k) {
                return Err(err(
                    "facts",
                    format!(
                        "invalid key {:?}: use 1-63 letters, digits, `.`, `_`, `/` or `-`",
                        truncated(k)
                    ),
                ));
            }
            if !crate::selector::valid_value(v, false) {
                return Err(err(
                    "facts",
                    format!(
                        "invalid value {:?} for `{k}`: use up to 63 letters, digits, `.`, `_` or `-`",
                        truncated(v)
                    ),
                ));
            }
        }
        if allow.len() > MAX_ALLOW {
            return Err(err(
                "allow",
                format!("{} entries, at most {MAX_ALLOW}", allow.len()),
            ));
        }
        if let Some(bad) = allow.iter().find(|a| !crate::policy::valid_name(a)) {
            return Err(err(
                "allow",
                format!("{:?} is not a command name", truncated(bad)),
            ));
        }
        Ok(HostReport {
            version: version.to_owned(),
            hostname: hostname.to_owned(),
            facts,
            allow,
        })
    }
}

/// Whether `name` may be an entry of a host's allow-list narrowing: a
/// command name as the policy spells them (agent.toml is checked with the
/// same rule the controller applies to the `Hello`).
pub fn is_allow_entry(name: &str) -> bool {
    crate::policy::valid_name(name)
}

/// The start of a refused value, for the error message.
fn truncated(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// (version, hostname, facts, allow, the field refused or `None`)
    type Case<'a> = (
        &'a str,
        &'a str,
        BTreeMap<String, String>,
        Vec<String>,
        Option<&'a str>,
    );

    #[test]
    fn reports_are_checked_field_by_field() {
        let many: BTreeMap<String, String> = (0..=MAX_FACTS)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        let long = "a".repeat(64);
        let cases: &[Case] = &[
            (
                "1.4.0",
                "web-1",
                facts(&[("os", "debian")]),
                vec!["uptime".into()],
                None,
            ),
            ("", "", BTreeMap::new(), vec![], None),
            (
                "1.4.0+git.3",
                "web_1.example.com",
                BTreeMap::new(),
                vec![],
                None,
            ),
            ("1.4\x1b[2J", "", BTreeMap::new(), vec![], Some("version")),
            (&long[..], "", BTreeMap::new(), vec![], None),
            ("1.0", "web\r1", BTreeMap::new(), vec![], Some("hostname")),
            ("1.0", "web 1", BTreeMap::new(), vec![], Some("hostname")),
            (
                "1.0",
                "",
                facts(&[("os", "deb\u{202e}ian")]),
                vec![],
                Some("facts"),
            ),
            (
                "1.0",
                "",
                facts(&[("o s", "debian")]),
                vec![],
                Some("facts"),
            ),
            (
                "1.0",
                "",
                facts(&[("os", &long[..])]),
                vec![],
                Some("facts"),
            ),
            ("1.0", "", many, vec![], Some("facts")),
            (
                "1.0",
                "",
                BTreeMap::new(),
                vec!["rm -rf".into()],
                Some("allow"),
            ),
            (
                "1.0",
                "",
                BTreeMap::new(),
                vec!["x".into(); MAX_ALLOW + 1],
                Some("allow"),
            ),
        ];
        for (version, host, facts, allow, want) in cases {
            let got = HostReport::new(version, host, facts.clone(), allow.clone());
            assert_eq!(
                got.as_ref().err().map(|e| e.field),
                *want,
                "{version:?} {host:?}: {got:?}"
            );
        }
        let version = "1".repeat(MAX_VERSION + 1);
        let e = HostReport::new(&version, "", BTreeMap::new(), vec![])
            .expect_err("a version over 64 bytes is refused");
        assert_eq!(e.to_string(), "hello version: 65 bytes, at most 64");
    }
}

/// Most check results one heartbeat may carry.
pub const MAX_CHECKS: usize = 64;
/// Longest check summary: the agent cuts a plugin's first line to 512
/// bytes plus an ellipsis, so this leaves room and still bounds a rogue.
pub const MAX_CHECK_SUMMARY: usize = 1024;
/// Most perfdata values of one check result.
pub const MAX_PERFDATA: usize = 32;
/// Most disks one heartbeat may report.
pub const MAX_DISKS: usize = 64;
const MAX_CHECK_NAME: usize = 64;
const MAX_PERF_FIELD: usize = 64;
const MAX_MOUNT: usize = 4096;

/// One check result of a heartbeat, as plain values.
#[derive(Clone, Copy, Debug)]
pub struct CheckFields<'a> {
    pub name: &'a str,
    pub kind: &'a str,
    pub summary: &'a str,
    /// Each perfdata value's label, unit, warn and crit.
    pub perfdata: &'a [[&'a str; 4]],
}

/// Which part of a heartbeat was refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("heartbeat {field}: {reason}")]
pub struct HeartbeatError {
    pub field: String,
    pub reason: String,
}

fn hb_err(field: impl Into<String>, reason: impl Into<String>) -> HeartbeatError {
    HeartbeatError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Checks what a heartbeat reports about the host's checks and disks
/// before the controller keeps it: the results feed service states, the
/// audit trail, alerts in chat and every listing, so one host must not be
/// able to make them unbounded or unreadable. Names as agent.toml allows
/// them (1–64 of letters, digits, `-_.`), at most [`MAX_CHECKS`] results,
/// summaries of at most [`MAX_CHECK_SUMMARY`] bytes, at most
/// [`MAX_PERFDATA`] perfdata values with short fields, at most
/// [`MAX_DISKS`] disks. Summaries are text from plugins and may hold
/// anything: every renderer escapes them (`terminal`, chat).
pub fn check_heartbeat(checks: &[CheckFields<'_>], mounts: &[&str]) -> Result<(), HeartbeatError> {
    if checks.len() > MAX_CHECKS {
        return Err(hb_err(
            "checks",
            format!("{} results, at most {MAX_CHECKS}", checks.len()),
        ));
    }
    for (i, c) in checks.iter().enumerate() {
        let at = |f: &str| format!("checks[{i}].{f}");
        if c.name.is_empty()
            || c.name.len() > MAX_CHECK_NAME
            || !c
                .name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'))
        {
            return Err(hb_err(
                at("name"),
                "must be 1-64 letters, digits, '-', '_' or '.'",
            ));
        }
        if c.kind.len() > 16 || !c.kind.chars().all(|ch| ch.is_ascii_lowercase()) {
            return Err(hb_err(at("kind"), "must be at most 16 lowercase letters"));
        }
        if c.summary.len() > MAX_CHECK_SUMMARY {
            return Err(hb_err(
                at("summary"),
                format!("{} bytes, at most {MAX_CHECK_SUMMARY}", c.summary.len()),
            ));
        }
        if c.perfdata.len() > MAX_PERFDATA {
            return Err(hb_err(
                at("perfdata"),
                format!("{} values, at most {MAX_PERFDATA}", c.perfdata.len()),
            ));
        }
        for (j, fields) in c.perfdata.iter().enumerate() {
            if let Some(f) = fields.iter().find(|f| f.len() > MAX_PERF_FIELD) {
                return Err(hb_err(
                    format!("checks[{i}].perfdata[{j}]"),
                    format!("field of {} bytes, at most {MAX_PERF_FIELD}", f.len()),
                ));
            }
        }
    }
    if mounts.len() > MAX_DISKS {
        return Err(hb_err(
            "disks",
            format!("{} disks, at most {MAX_DISKS}", mounts.len()),
        ));
    }
    if let Some(m) = mounts.iter().find(|m| m.len() > MAX_MOUNT) {
        return Err(hb_err(
            "disks",
            format!("mount point of {} bytes, at most {MAX_MOUNT}", m.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod heartbeat_tests {
    use super::*;

    fn check<'a>(name: &'a str, summary: &'a str, perfdata: &'a [[&'a str; 4]]) -> CheckFields<'a> {
        CheckFields {
            name,
            kind: "nagios",
            summary,
            perfdata,
        }
    }

    #[test]
    fn heartbeats_are_bounded_and_plain() {
        let ok = [check(
            "disk",
            "DISK OK - 40% used",
            &[["/", "%", "80", "90"]],
        )];
        assert_eq!(check_heartbeat(&ok, &["/", "/var"]), Ok(()));
        let big = "S".repeat(2_200_000);
        let field_of = |r: Result<(), HeartbeatError>| r.map_err(|e| e.field);
        assert_eq!(
            field_of(check_heartbeat(&[check("disk", &big, &[])], &[])),
            Err("checks[0].summary".into())
        );
        let many: Vec<_> = (0..MAX_CHECKS + 1).map(|_| check("c", "", &[])).collect();
        assert_eq!(field_of(check_heartbeat(&many, &[])), Err("checks".into()));
        for name in ["", "zz:OK   env=prod,role=db", "a\x1b[2J", &"n".repeat(65)] {
            assert_eq!(
                field_of(check_heartbeat(&[check(name, "", &[])], &[])),
                Err("checks[0].name".into()),
                "{name:?}"
            );
        }
        let long = "p".repeat(65);
        let perf = [[long.as_str(), "", "", ""]];
        assert_eq!(
            field_of(check_heartbeat(&[check("c", "", &perf)], &[])),
            Err("checks[0].perfdata[0]".into())
        );
        let perfs: Vec<[&str; 4]> = (0..MAX_PERFDATA + 1).map(|_| ["l", "", "", ""]).collect();
        assert_eq!(
            field_of(check_heartbeat(&[check("c", "", &perfs)], &[])),
            Err("checks[0].perfdata".into())
        );
        let mounts: Vec<&str> = (0..MAX_DISKS + 1).map(|_| "/").collect();
        assert_eq!(field_of(check_heartbeat(&[], &mounts)), Err("disks".into()));
    }
}
