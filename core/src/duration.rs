//! Durations as written in policies, chat options and CLI flags: `500ms`,
//! `10s`, `5m`, `2h`, `1d`; a bare number means seconds.

use std::time::Duration;

/// Parses `500ms`, `10s`, `5m`, `2h`, `1d` or a bare number of seconds.
///
/// ```
/// use std::time::Duration;
/// use fleetcmd_core::duration::parse_duration;
/// assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
/// ```
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || {
        format!(
            "invalid duration \"{}\": expected a number with a unit such as 500ms, 10s, 5m, 2h or 1d",
            crate::terminal::excerpt(s)
        )
    };
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(err());
    }
    let n: u64 = num.parse().map_err(|_| err())?;
    let ms_per_unit: u64 = match unit {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(err()),
    };
    let ms = n.checked_mul(ms_per_unit).ok_or_else(err)?;
    Ok(Duration::from_millis(ms))
}

/// The shortest timeout a job may be given: a job carries its timeout in
/// whole seconds, where 0 means "the command's own timeout", so a shorter
/// one would silently become the policy's default.
pub const MIN_JOB_TIMEOUT: Duration = Duration::from_secs(1);

/// Parses a job's `--timeout` (chat and CLI): a [`parse_duration`] of at
/// least [`MIN_JOB_TIMEOUT`] in whole seconds; anything else is refused
/// rather than rounded.
///
/// ```
/// use std::time::Duration;
/// use fleetcmd_core::duration::parse_job_timeout;
/// assert_eq!(parse_job_timeout("90s"), Ok(Duration::from_secs(90)));
/// assert!(parse_job_timeout("500ms").unwrap_err().contains("at least 1s"));
/// ```
pub fn parse_job_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    let shown = crate::terminal::excerpt(s.trim());
    if d < MIN_JOB_TIMEOUT {
        return Err(format!(
            "must be at least {} (a job's timeout is whole seconds), got {shown}",
            format_duration(MIN_JOB_TIMEOUT)
        ));
    }
    if d.subsec_nanos() != 0 {
        return Err(format!(
            "must be whole seconds (a job's timeout is whole seconds), got {shown}"
        ));
    }
    Ok(d)
}

/// The canonical text of a duration [`parse_duration`] accepts: trimmed,
/// the number in plain decimal without leading zeros, the unit as written
/// (`0010s` → `10s`, ` 5m ` → `5m`, `007` → `7`). What an argument check
/// parsed is what the command gets: a command reading `010` as octal would
/// otherwise see 8 where 10 was checked (found by an outside test).
pub fn canonical_duration(s: &str) -> Result<String, String> {
    parse_duration(s)?;
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|e| format!("{e}"))?;
    Ok(format!("{n}{unit}"))
}

/// A point in time as written in `--since`/`--until` and chat `audit`:
/// a duration (`2h`: that long before `now_ms`) or an RFC 3339 time; unix ms.
/// Formats a duration the way [`parse_duration`] reads it, largest units
/// first: `1h30m`, `45s`, `2d`, `250ms`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let mut secs = d.as_secs();
    let mut out = String::new();
    for (unit, n) in [("d", 86400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= n {
            out.push_str(&format!("{}{unit}", secs / n));
            secs %= n;
        }
    }
    out
}

pub fn parse_time_ms(s: &str, now_ms: u64) -> Result<u64, String> {
    if let Ok(d) = parse_duration(s) {
        return Ok(now_ms.saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)));
    }
    let t = time::OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339)
        .map_err(|_| {
        format!("time {s:?}: expected a duration such as 2h or an RFC 3339 time")
    })?;
    Ok(u64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_durations_ago_or_rfc3339() {
        assert_eq!(parse_time_ms("2h", 10_000_000), Ok(10_000_000 - 7_200_000));
        assert_eq!(parse_time_ms("1970-01-01T00:00:01Z", 0), Ok(1000));
        assert!(parse_time_ms("yesterday", 0).is_err());
    }

    fn check(input: &str, expected: Option<Duration>) {
        assert_eq!(
            parse_duration(input).ok(),
            expected,
            "parse_duration({input:?})"
        );
    }

    #[test]
    fn table() {
        check("500ms", Some(Duration::from_millis(500)));
        check("10s", Some(Duration::from_secs(10)));
        check("10", Some(Duration::from_secs(10)));
        check(" 5m ", Some(Duration::from_secs(300)));
        check("2h", Some(Duration::from_secs(7200)));
        check("1d", Some(Duration::from_secs(86400)));
        check("0s", Some(Duration::ZERO));
        check("", None);
        check("s", None);
        check("-1s", None);
        check("1.5s", None);
        check("10 s", None);
        check("3w", None);
        check("99999999999999999999d", None);
        check("999999999999999999d", None);
    }

    #[test]
    fn error_names_input() {
        let e = parse_duration("3w").expect_err("weeks are not a unit");
        assert!(e.contains("\"3w\""), "{e}");
    }
}
