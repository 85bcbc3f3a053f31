//! Times as people read them, for the CLI and chat replies alike: a moment
//! as RFC 3339 in UTC and relative to now (`3 min ago`, `in 2 h`), and a
//! length of time in short words (`1.5 s`, `3 min 4 s`). Pure: the caller
//! passes `now`, so every rendering is tested without a clock.
//!
//! Times are unix milliseconds, as the controller's API carries them; `0`
//! means "never" or "not known" and renders as `-`.

const SEC: u64 = 1_000;
const MIN: u64 = 60 * SEC;
const HOUR: u64 = 60 * MIN;
const DAY: u64 = 24 * HOUR;

/// `2026-12-06T05:52:33Z` (whole seconds, UTC); `-` for 0.
pub fn rfc3339(at_ms: u64) -> String {
    if at_ms == 0 {
        return "-".into();
    }
    let secs = i64::try_from(at_ms / 1000).unwrap_or(i64::MAX);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{at_ms} ms after the epoch"))
}

/// `just now`, `42 s ago`, `3 min ago`, `2 h ago`, `5 d ago`; a time after
/// `now_ms` reads `in 3 min`; `-` for 0.
pub fn relative(now_ms: u64, at_ms: u64) -> String {
    if at_ms == 0 {
        return "-".into();
    }
    let (diff, future) = if at_ms > now_ms {
        (at_ms - now_ms, true)
    } else {
        (now_ms - at_ms, false)
    };
    if diff < SEC {
        return "just now".into();
    }
    let amount = coarse(diff);
    if future {
        format!("in {amount}")
    } else {
        format!("{amount} ago")
    }
}

/// Both: `2026-12-06T05:52:33Z (3 min ago)`; `-` for 0.
pub fn stamp(now_ms: u64, at_ms: u64) -> String {
    if at_ms == 0 {
        return "-".into();
    }
    format!("{} ({})", rfc3339(at_ms), relative(now_ms, at_ms))
}

/// The largest whole unit of a length of time: `42 s`, `3 min`, `2 h`, `5 d`.
pub fn coarse(ms: u64) -> String {
    match ms {
        _ if ms < MIN => format!("{} s", ms / SEC),
        _ if ms < HOUR => format!("{} min", ms / MIN),
        _ if ms < DAY => format!("{} h", ms / HOUR),
        _ => format!("{} d", ms / DAY),
    }
}

/// How long something took, to the precision that matters at its size:
/// `250 ms`, `1.5 s`, `42 s`, `3 min 4 s`, `2 h 5 min`, `3 d 4 h`.
pub fn elapsed(ms: u64) -> String {
    let two = |big: u64, big_unit: &str, small: u64, small_unit: &str| {
        if small == 0 {
            format!("{big} {big_unit}")
        } else {
            format!("{big} {big_unit} {small} {small_unit}")
        }
    };
    match ms {
        _ if ms < SEC => format!("{ms} ms"),
        _ if ms < 10 * SEC => format!("{:.1} s", ms as f64 / 1000.0),
        _ if ms < MIN => format!("{} s", ms / SEC),
        _ if ms < HOUR => two(ms / MIN, "min", ms % MIN / SEC, "s"),
        _ if ms < DAY => two(ms / HOUR, "h", ms % HOUR / MIN, "min"),
        _ => two(ms / DAY, "d", ms % DAY / HOUR, "h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-12-06T05:52:33Z
    const T: u64 = 1_796_536_353_000;

    #[test]
    fn moments_are_rfc3339_in_utc_and_zero_is_a_dash() {
        assert_eq!(rfc3339(T), "2026-12-06T05:52:33Z");
        assert_eq!(rfc3339(T + 999), "2026-12-06T05:52:33Z");
        assert_eq!(rfc3339(0), "-");
        assert_eq!(
            rfc3339(u64::MAX),
            format!("{} ms after the epoch", u64::MAX)
        );
    }

    #[test]
    fn relative_times_use_the_largest_whole_unit_both_ways() {
        for (now, at, expected) in [
            (T, T, "just now"),
            (T + 999, T, "just now"),
            (T + 42_000, T, "42 s ago"),
            (T + 3 * MIN + 59 * SEC, T, "3 min ago"),
            (T + 2 * HOUR, T, "2 h ago"),
            (T + 5 * DAY + HOUR, T, "5 d ago"),
            (T, T + 3 * MIN, "in 3 min"),
            (T, 0, "-"),
        ] {
            assert_eq!(relative(now, at), expected, "now {now} at {at}");
        }
        assert_eq!(stamp(T + 3 * MIN, T), "2026-12-06T05:52:33Z (3 min ago)");
        assert_eq!(stamp(T, 0), "-");
    }

    #[test]
    fn lengths_keep_the_precision_that_matters() {
        for (ms, expected) in [
            (0, "0 ms"),
            (250, "250 ms"),
            (1_500, "1.5 s"),
            (42_000, "42 s"),
            (3 * MIN, "3 min"),
            (3 * MIN + 4 * SEC, "3 min 4 s"),
            (2 * HOUR + 5 * MIN + 7 * SEC, "2 h 5 min"),
            (3 * DAY + 4 * HOUR, "3 d 4 h"),
        ] {
            assert_eq!(elapsed(ms), expected, "{ms} ms");
        }
    }
}
