//! `[[check]]` entries of agent.toml: read flat (one struct for every kind,
//! so validation can name a key that does not belong to a kind instead of
//! failing on the first one), then turned into a [`CheckConfig`] per entry
//! with every problem reported under its key path (`check[2].timeout: …`).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use fleetcmd_core::duration::parse_duration;
use fleetcmd_core::nagios::Range;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use serde::Deserialize;

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// The systemctl run by `systemd` checks unless `systemctl` says otherwise.
pub const SYSTEMCTL: &str = "/usr/bin/systemctl";
const KINDS: &[&str] = &["systemd", "tcp", "http", "disk", "load", "memory", "nagios"];

/// One `[[check]]` table as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCheck {
    pub name: Option<String>,
    pub kind: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    // systemd
    pub unit: Option<String>,
    pub systemctl: Option<PathBuf>,
    // tcp
    pub address: Option<String>,
    // http
    pub url: Option<String>,
    pub expect_status: Option<RawStatus>,
    pub body_contains: Option<String>,
    pub body_regex: Option<String>,
    pub ca_file: Option<PathBuf>,
    // disk, load, memory
    pub mount: Option<String>,
    pub warn: Option<String>,
    pub crit: Option<String>,
    pub per_cpu: Option<bool>,
    // nagios
    pub command: Option<Vec<String>>,
    pub env: Option<BTreeMap<String, String>>,
}

/// `expect_status`: `200`, `"200-399"`, or a list of either.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawStatus {
    One(RawStatusItem),
    List(Vec<RawStatusItem>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawStatusItem {
    Code(i64),
    Text(String),
}

/// A validated check.
#[derive(Debug, Clone)]
pub struct CheckConfig {
    /// Unique on this agent; what the controller's services match on.
    pub name: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub kind: CheckKind,
}

#[derive(Debug, Clone)]
pub enum CheckKind {
    Systemd {
        unit: String,
        systemctl: PathBuf,
    },
    Tcp {
        address: String,
    },
    Http(HttpCheck),
    Disk {
        /// `None`: every real mount.
        mount: Option<String>,
        limits: Limits,
    },
    Load {
        /// load1, load5, load15.
        limits: [Limits; 3],
        per_cpu: bool,
    },
    Memory {
        limits: Limits,
    },
    Nagios {
        command: Vec<String>,
        env: BTreeMap<String, String>,
    },
}

impl CheckKind {
    pub fn name(&self) -> &'static str {
        match self {
            CheckKind::Systemd { .. } => "systemd",
            CheckKind::Tcp { .. } => "tcp",
            CheckKind::Http(_) => "http",
            CheckKind::Disk { .. } => "disk",
            CheckKind::Load { .. } => "load",
            CheckKind::Memory { .. } => "memory",
            CheckKind::Nagios { .. } => "nagios",
        }
    }
}

#[derive(Debug, Clone)]
pub struct HttpCheck {
    /// `http://` or `https://` with a host (no user info).
    pub url: hyper::Uri,
    /// Inclusive ranges of accepted status codes.
    pub expect_status: Vec<(u16, u16)>,
    pub body_contains: Option<String>,
    pub body_regex: Option<regex::Regex>,
    /// Trust only these CAs (a private CA) instead of the public roots.
    pub ca_certs: Option<Vec<CertificateDer<'static>>>,
    pub ca_file: Option<PathBuf>,
}

/// WARNING/CRITICAL ranges of one figure, with their text for perfdata.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    pub warn: Option<(String, Range)>,
    pub crit: Option<(String, Range)>,
}

impl Limits {
    pub fn thresholds(&self) -> fleetcmd_core::nagios::Thresholds {
        fleetcmd_core::nagios::Thresholds {
            warn: self.warn.as_ref().map(|w| w.1),
            crit: self.crit.as_ref().map(|c| c.1),
        }
    }
}

/// Keys each kind accepts besides the common ones.
fn kind_keys(kind: &str) -> &'static [&'static str] {
    match kind {
        "systemd" => &["unit", "systemctl"],
        "tcp" => &["address"],
        "http" => &[
            "url",
            "expect_status",
            "body_contains",
            "body_regex",
            "ca_file",
        ],
        "disk" => &["mount", "warn", "crit"],
        "load" => &["warn", "crit", "per_cpu"],
        "memory" => &["warn", "crit"],
        "nagios" => &["command", "env"],
        _ => &[],
    }
}

impl RawCheck {
    fn present_keys(&self) -> Vec<&'static str> {
        let mut keys = Vec::new();
        let mut key = |set: bool, name: &'static str| {
            if set {
                keys.push(name);
            }
        };
        key(self.unit.is_some(), "unit");
        key(self.systemctl.is_some(), "systemctl");
        key(self.address.is_some(), "address");
        key(self.url.is_some(), "url");
        key(self.expect_status.is_some(), "expect_status");
        key(self.body_contains.is_some(), "body_contains");
        key(self.body_regex.is_some(), "body_regex");
        key(self.ca_file.is_some(), "ca_file");
        key(self.mount.is_some(), "mount");
        key(self.warn.is_some(), "warn");
        key(self.crit.is_some(), "crit");
        key(self.per_cpu.is_some(), "per_cpu");
        key(self.command.is_some(), "command");
        key(self.env.is_some(), "env");
        keys
    }
}

/// Validates every `[[check]]`; problems are pushed with their key path.
pub fn validate_checks(raw: &[RawCheck], problems: &mut Vec<String>) -> Vec<CheckConfig> {
    let mut names = HashSet::new();
    let mut out = Vec::new();
    for (i, check) in raw.iter().enumerate() {
        let at = format!("check[{i}]");
        let before = problems.len();
        let name = match check.name.as_deref() {
            None | Some("") => {
                problems.push(format!("{at}.name: required"));
                String::new()
            }
            Some(n) => {
                if !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                    || n.len() > 64
                {
                    problems.push(format!(
                        "{at}.name: {n:?} must be 1-64 letters, digits, '-', '_' or '.'"
                    ));
                } else if !names.insert(n.to_owned()) {
                    problems.push(format!("{at}.name: duplicate check name {n:?}"));
                }
                n.to_owned()
            }
        };
        let kind = check.kind.as_deref().unwrap_or("");
        if kind.is_empty() {
            problems.push(format!("{at}.kind: required, one of {}", KINDS.join(", ")));
        } else if !KINDS.contains(&kind) {
            problems.push(format!(
                "{at}.kind: unknown kind {kind:?}, expected one of {}",
                KINDS.join(", ")
            ));
        } else {
            for key in check.present_keys() {
                if !kind_keys(kind).contains(&key) {
                    problems.push(format!("{at}.{key}: not a key of kind {kind}"));
                }
            }
        }
        let interval = match check.interval.as_deref().map(parse_duration) {
            None => DEFAULT_INTERVAL,
            Some(Ok(d)) if d >= MIN_INTERVAL => d,
            Some(Ok(d)) => {
                problems.push(format!("{at}.interval: must be at least 1s, got {d:?}"));
                DEFAULT_INTERVAL
            }
            Some(Err(e)) => {
                problems.push(format!("{at}.interval: {e}"));
                DEFAULT_INTERVAL
            }
        };
        // Unset, the timeout also fits short intervals.
        let timeout = match check.timeout.as_deref().map(parse_duration) {
            None => DEFAULT_TIMEOUT.min(interval / 2),
            Some(Ok(d)) if d.is_zero() => {
                problems.push(format!("{at}.timeout: must be more than 0s"));
                d
            }
            Some(Ok(d)) => {
                if d >= interval {
                    problems.push(format!(
                        "{at}.timeout: must be less than interval ({interval:?}), got {d:?}"
                    ));
                }
                d
            }
            Some(Err(e)) => {
                problems.push(format!("{at}.timeout: {e}"));
                DEFAULT_TIMEOUT
            }
        };
        let kind = match kind {
            "systemd" => systemd(check, &at, problems),
            "tcp" => tcp(check, &at, problems),
            "http" => http(check, &at, problems),
            "disk" => {
                let mount = check.mount.clone();
                if let Some(m) = &mount
                    && !m.starts_with('/')
                {
                    problems.push(format!("{at}.mount: must be an absolute path, got {m:?}"));
                }
                Some(CheckKind::Disk {
                    mount,
                    limits: percent_limits(check, &at, problems),
                })
            }
            "memory" => Some(CheckKind::Memory {
                limits: percent_limits(check, &at, problems),
            }),
            "load" => Some(load(check, &at, problems)),
            "nagios" => nagios(check, &at, problems),
            _ => None,
        };
        if problems.len() == before
            && let Some(kind) = kind
        {
            out.push(CheckConfig {
                name,
                interval,
                timeout,
                kind,
            });
        }
    }
    out
}

fn required<'a>(
    value: &'a Option<String>,
    at: &str,
    key: &str,
    example: &str,
    problems: &mut Vec<String>,
) -> Option<&'a str> {
    match value.as_deref() {
        None | Some("") => {
            problems.push(format!("{at}.{key}: required, e.g. {example}"));
            None
        }
        Some(v) => Some(v),
    }
}

fn systemd(check: &RawCheck, at: &str, problems: &mut Vec<String>) -> Option<CheckKind> {
    let unit = required(&check.unit, at, "unit", "\"nginx.service\"", problems)?;
    // Passed as one argv element after `--`, but a unit name never needs
    // these, and refusing them keeps the argument a unit name.
    if unit.starts_with('-') || unit.chars().any(|c| c.is_whitespace() || c.is_control()) {
        problems.push(format!("{at}.unit: {unit:?} is not a unit name"));
        return None;
    }
    let systemctl = check
        .systemctl
        .clone()
        .unwrap_or_else(|| PathBuf::from(SYSTEMCTL));
    if !systemctl.is_absolute() {
        problems.push(format!(
            "{at}.systemctl: must be an absolute path, got {:?}",
            systemctl
        ));
        return None;
    }
    Some(CheckKind::Systemd {
        unit: unit.to_owned(),
        systemctl,
    })
}

fn tcp(check: &RawCheck, at: &str, problems: &mut Vec<String>) -> Option<CheckKind> {
    let address = required(
        &check.address,
        at,
        "address",
        "\"127.0.0.1:5432\"",
        problems,
    )?;
    match address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => {
            Some(CheckKind::Tcp {
                address: address.to_owned(),
            })
        }
        _ => {
            problems.push(format!(
                "{at}.address: {address:?} must be host:port, e.g. \"db.internal:5432\" or \"[::1]:5432\""
            ));
            None
        }
    }
}

fn http(check: &RawCheck, at: &str, problems: &mut Vec<String>) -> Option<CheckKind> {
    let before = problems.len();
    let url = required(
        &check.url,
        at,
        "url",
        "\"https://127.0.0.1:8443/healthz\"",
        problems,
    )
    .and_then(|u| match u.parse::<hyper::Uri>() {
        Ok(url)
            if matches!(url.scheme_str(), Some("http" | "https"))
                && url.host().is_some_and(|h| !h.is_empty())
                && !url.authority().is_some_and(|a| a.as_str().contains('@')) =>
        {
            Some(url)
        }
        Ok(_) => {
            problems.push(format!(
                "{at}.url: {u:?} must be an http:// or https:// URL"
            ));
            None
        }
        Err(e) => {
            problems.push(format!("{at}.url: {u:?}: {e}"));
            None
        }
    });
    let expect_status = match &check.expect_status {
        None => vec![(200, 399)],
        Some(RawStatus::One(item)) => status_items(std::slice::from_ref(item), at, problems),
        Some(RawStatus::List(items)) if items.is_empty() => {
            problems.push(format!("{at}.expect_status: empty list"));
            Vec::new()
        }
        Some(RawStatus::List(items)) => status_items(items, at, problems),
    };
    let body_regex = check
        .body_regex
        .as_deref()
        .and_then(|r| match regex::Regex::new(r) {
            Ok(re) => Some(re),
            Err(e) => {
                problems.push(format!("{at}.body_regex: {e}"));
                None
            }
        });
    let ca_certs = check.ca_file.as_ref().and_then(|path| {
        if !path.is_absolute() {
            problems.push(format!(
                "{at}.ca_file: must be an absolute path, got {path:?}"
            ));
            return None;
        }
        match read_certs(path) {
            Ok(certs) if certs.is_empty() => {
                problems.push(format!(
                    "{at}.ca_file: {} holds no PEM certificate",
                    path.display()
                ));
                None
            }
            Ok(certs) => Some(certs),
            Err(e) => {
                problems.push(format!("{at}.ca_file: {}: {e}", path.display()));
                None
            }
        }
    });
    if let Some(url) = &url
        && url.scheme_str() == Some("http")
        && check.ca_file.is_some()
    {
        problems.push(format!("{at}.ca_file: the url is not https"));
    }
    if problems.len() != before {
        return None;
    }
    Some(CheckKind::Http(HttpCheck {
        url: url?,
        expect_status,
        body_contains: check.body_contains.clone(),
        body_regex,
        ca_certs,
        ca_file: check.ca_file.clone(),
    }))
}

fn read_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_file_iter(path)
        .map_err(|e| e.to_string())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

fn status_items(items: &[RawStatusItem], at: &str, problems: &mut Vec<String>) -> Vec<(u16, u16)> {
    let mut out = Vec::new();
    let code = |v: i64| u16::try_from(v).ok().filter(|c| (100..=599).contains(c));
    for item in items {
        let parsed = match item {
            RawStatusItem::Code(c) => code(*c).map(|c| (c, c)),
            RawStatusItem::Text(t) => match t.split_once('-') {
                None => t.trim().parse().ok().and_then(code).map(|c| (c, c)),
                Some((a, b)) => match (
                    a.trim().parse().ok().and_then(code),
                    b.trim().parse().ok().and_then(code),
                ) {
                    (Some(a), Some(b)) if a <= b => Some((a, b)),
                    _ => None,
                },
            },
        };
        match parsed {
            Some(r) => out.push(r),
            None => problems.push(format!(
                "{at}.expect_status: {} is not a status code (100-599) or a range such as \"200-399\"",
                match item {
                    RawStatusItem::Code(c) => c.to_string(),
                    RawStatusItem::Text(t) => format!("{t:?}"),
                }
            )),
        }
    }
    out
}

/// `"80%"`, `"80"` (used above 80 % alerts) or any Nagios range.
fn percent_range(
    text: &str,
    at: &str,
    key: &str,
    problems: &mut Vec<String>,
) -> Option<(String, Range)> {
    let bare = text.trim().trim_end_matches('%');
    match Range::parse(bare) {
        Ok(r) => Some((bare.to_owned(), r)),
        Err(e) => {
            problems.push(format!(
                "{at}.{key}: {e}; expected a used percentage such as \"80%\" or a Nagios range"
            ));
            None
        }
    }
}

fn percent_limits(check: &RawCheck, at: &str, problems: &mut Vec<String>) -> Limits {
    let limits = Limits {
        warn: check
            .warn
            .as_deref()
            .and_then(|w| percent_range(w, at, "warn", problems)),
        crit: check
            .crit
            .as_deref()
            .and_then(|c| percent_range(c, at, "crit", problems)),
    };
    if check.warn.is_none() && check.crit.is_none() {
        problems.push(format!(
            "{at}: set warn and/or crit, e.g. warn = \"80%\", crit = \"90%\""
        ));
    }
    limits
}

/// `warn = "4"` (all three averages) or `"8,6,4"` (load1, load5, load15).
fn load(check: &RawCheck, at: &str, problems: &mut Vec<String>) -> CheckKind {
    let mut limits: [Limits; 3] = Default::default();
    for (key, text) in [("warn", &check.warn), ("crit", &check.crit)] {
        let Some(text) = text else { continue };
        let parts: Vec<&str> = text.split(',').collect();
        if parts.len() != 1 && parts.len() != 3 {
            problems.push(format!(
                "{at}.{key}: {text:?} must be one range or three (load1,load5,load15)"
            ));
            continue;
        }
        for (n, limit) in limits.iter_mut().enumerate() {
            let part = parts[if parts.len() == 1 { 0 } else { n }].trim();
            match Range::parse(part) {
                Ok(r) => {
                    let slot = if key == "warn" {
                        &mut limit.warn
                    } else {
                        &mut limit.crit
                    };
                    *slot = Some((part.to_owned(), r));
                }
                Err(e) => {
                    problems.push(format!("{at}.{key}: {e}"));
                    break;
                }
            }
        }
    }
    if check.warn.is_none() && check.crit.is_none() {
        problems.push(format!(
            "{at}: set warn and/or crit, e.g. warn = \"8,6,4\", crit = \"16,12,8\""
        ));
    }
    CheckKind::Load {
        limits,
        per_cpu: check.per_cpu.unwrap_or(false),
    }
}

fn nagios(check: &RawCheck, at: &str, problems: &mut Vec<String>) -> Option<CheckKind> {
    let before = problems.len();
    match check.command.as_deref() {
        None | Some([]) => problems.push(format!(
            "{at}.command: required, an argv array such as [\"/usr/lib/nagios/plugins/check_disk\", \"-w\", \"20%\", \"-p\", \"/\"]"
        )),
        Some([program, ..]) if !program.starts_with('/') => problems.push(format!(
            "{at}.command: the program must be an absolute path (no PATH lookup, no shell), got {program:?}"
        )),
        Some(argv) => {
            if argv.iter().any(|a| a.contains('\0')) {
                problems.push(format!("{at}.command: arguments cannot hold NUL bytes"));
            }
        }
    }
    let env = check.env.clone().unwrap_or_default();
    for key in env.keys() {
        let valid = !key.is_empty()
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            problems.push(format!("{at}.env.{key}: not an environment variable name"));
        }
    }
    if env.values().any(|v| v.contains('\0')) {
        problems.push(format!("{at}.env: values cannot hold NUL bytes"));
    }
    (problems.len() == before).then(|| CheckKind::Nagios {
        command: check.command.clone().unwrap_or_default(),
        env,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<CheckConfig>, Vec<String>> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            check: Vec<RawCheck>,
        }
        let file: File = toml::from_str(text).map_err(|e| vec![e.to_string()])?;
        let mut problems = Vec::new();
        let checks = validate_checks(&file.check, &mut problems);
        if problems.is_empty() {
            Ok(checks)
        } else {
            Err(problems)
        }
    }

    /// `text` is invalid and the problems are exactly `expected`.
    fn check_problems(text: &str, expected: &[&str]) {
        let problems = parse(text).expect_err(text);
        assert_eq!(problems, expected, "{text}");
    }

    #[test]
    fn defaults_and_every_kind() {
        let checks = parse(
            r#"
            [[check]]
            name = "nginx"
            kind = "systemd"
            unit = "nginx.service"
            [[check]]
            name = "db"
            kind = "tcp"
            address = "[::1]:5432"
            interval = "5s"
            [[check]]
            name = "api"
            kind = "http"
            url = "http://127.0.0.1:8080/healthz"
            expect_status = [200, "300-302"]
            body_regex = "ok|ready"
            [[check]]
            name = "root"
            kind = "disk"
            mount = "/"
            warn = "80%"
            crit = "90%"
            [[check]]
            name = "load"
            kind = "load"
            warn = "8,6,4"
            crit = "16"
            per_cpu = true
            [[check]]
            name = "mem"
            kind = "memory"
            crit = "95%"
            [[check]]
            name = "ntp"
            kind = "nagios"
            command = ["/usr/lib/nagios/plugins/check_ntp_time", "-H", "pool.ntp.org"]
            env = { LC_ALL = "C" }
            interval = "1m"
            timeout = "20s"
            "#,
        )
        .expect("valid");
        let kinds: Vec<&str> = checks.iter().map(|c| c.kind.name()).collect();
        assert_eq!(
            kinds,
            ["systemd", "tcp", "http", "disk", "load", "memory", "nagios"]
        );
        assert_eq!(checks[0].interval, DEFAULT_INTERVAL);
        assert_eq!(checks[0].timeout, DEFAULT_TIMEOUT);
        // An unset timeout fits a short interval.
        assert_eq!(checks[1].timeout, Duration::from_millis(2500));
        assert_eq!(checks[6].timeout, Duration::from_secs(20));
        match &checks[0].kind {
            CheckKind::Systemd { systemctl, .. } => {
                assert_eq!(systemctl, &PathBuf::from(SYSTEMCTL))
            }
            other => panic!("{other:?}"),
        }
        match &checks[2].kind {
            CheckKind::Http(h) => assert_eq!(h.expect_status, [(200, 200), (300, 302)]),
            other => panic!("{other:?}"),
        }
        match &checks[4].kind {
            CheckKind::Load { limits, per_cpu } => {
                assert!(per_cpu);
                assert_eq!(limits[2].warn.as_ref().map(|w| w.0.as_str()), Some("4"));
                assert_eq!(limits[2].crit.as_ref().map(|w| w.0.as_str()), Some("16"));
            }
            other => panic!("{other:?}"),
        }
        match &checks[3].kind {
            CheckKind::Disk { limits, .. } => {
                assert_eq!(limits.warn.as_ref().map(|w| w.0.as_str()), Some("80"));
                assert_eq!(
                    limits.thresholds().evaluate(85.0),
                    fleetcmd_core::nagios::CheckState::Warning
                );
                assert_eq!(
                    limits.thresholds().evaluate(95.0),
                    fleetcmd_core::nagios::CheckState::Critical
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_problem_is_named_with_its_key_path() {
        check_problems(
            r#"
            [[check]]
            name = "a"
            kind = "tcp"
            address = "127.0.0.1:1"
            interval = "10s"
            timeout = "10s"
            [[check]]
            name = "a"
            kind = "tcp"
            address = "nohost"
            [[check]]
            kind = "smtp"
            [[check]]
            name = "u"
            kind = "systemd"
            url = "http://x"
            [[check]]
            name = "h"
            kind = "http"
            url = "ftp://x/"
            expect_status = [99, "400-300"]
            body_regex = "("
            [[check]]
            name = "d"
            kind = "disk"
            warn = "lots"
            mount = "var"
            [[check]]
            name = "l"
            kind = "load"
            warn = "1,2"
            [[check]]
            name = "m"
            kind = "memory"
            [[check]]
            name = "n"
            kind = "nagios"
            command = ["check_disk", "-w", "10%"]
            env = { "1X" = "y" }
            [[check]]
            name = "bad name"
            kind = "nagios"
            interval = "0s"
            timeout = "soon"
            "#,
            &[
                "check[0].timeout: must be less than interval (10s), got 10s",
                "check[1].name: duplicate check name \"a\"",
                "check[1].address: \"nohost\" must be host:port, e.g. \"db.internal:5432\" or \"[::1]:5432\"",
                "check[2].name: required",
                "check[2].kind: unknown kind \"smtp\", expected one of systemd, tcp, http, disk, load, memory, nagios",
                "check[3].url: not a key of kind systemd",
                "check[3].unit: required, e.g. \"nginx.service\"",
                "check[4].url: \"ftp://x/\" must be an http:// or https:// URL",
                "check[4].expect_status: 99 is not a status code (100-599) or a range such as \"200-399\"",
                "check[4].expect_status: \"400-300\" is not a status code (100-599) or a range such as \"200-399\"",
                "check[4].body_regex: regex parse error:\n    (\n    ^\nerror: unclosed group",
                "check[5].mount: must be an absolute path, got \"var\"",
                "check[5].warn: range \"lots\": \"lots\" is not a number; expected a used percentage such as \"80%\" or a Nagios range",
                "check[6].warn: \"1,2\" must be one range or three (load1,load5,load15)",
                "check[7]: set warn and/or crit, e.g. warn = \"80%\", crit = \"90%\"",
                "check[8].command: the program must be an absolute path (no PATH lookup, no shell), got \"check_disk\"",
                "check[8].env.1X: not an environment variable name",
                "check[9].name: \"bad name\" must be 1-64 letters, digits, '-', '_' or '.'",
                "check[9].interval: must be at least 1s, got 0ns",
                "check[9].timeout: invalid duration \"soon\": expected a number with a unit such as 500ms, 10s, 5m, 2h or 1d",
                "check[9].command: required, an argv array such as [\"/usr/lib/nagios/plugins/check_disk\", \"-w\", \"20%\", \"-p\", \"/\"]",
            ],
        );
    }

    #[test]
    fn ca_file_must_hold_certificates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let missing = dir.path().join("missing.pem");
        let text = format!(
            "[[check]]\nname = \"a\"\nkind = \"http\"\nurl = \"https://x/\"\nca_file = {:?}\n\
             [[check]]\nname = \"b\"\nkind = \"http\"\nurl = \"https://x/\"\nca_file = {:?}\n\
             [[check]]\nname = \"c\"\nkind = \"http\"\nurl = \"https://x/\"\nca_file = \"rel.pem\"\n",
            empty.display().to_string(),
            missing.display().to_string()
        );
        let problems = parse(&text).expect_err("bad ca files");
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert_eq!(
            problems[0],
            format!(
                "check[0].ca_file: {} holds no PEM certificate",
                empty.display()
            )
        );
        assert!(
            problems[1].starts_with(&format!("check[1].ca_file: {}: ", missing.display())),
            "{problems:?}"
        );
        assert_eq!(
            problems[2],
            "check[2].ca_file: must be an absolute path, got \"rel.pem\""
        );
    }

    #[test]
    fn unknown_keys_are_refused_by_serde() {
        let problems =
            parse("[[check]]\nname = \"a\"\nkind = \"tcp\"\naddres = \"x:1\"\n").expect_err("typo");
        assert!(
            problems[0].contains("unknown field `addres`"),
            "{problems:?}"
        );
    }
}
