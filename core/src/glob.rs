//! Whole-string glob matching shared by selectors and identity patterns.

/// Returns whether `text` matches `pattern` as a whole. `*` matches any run of
/// characters (including none); `?` matches exactly one character when
/// `question` is true and is literal otherwise. Everything else is literal.
pub(crate) fn glob_match(pattern: &str, text: &str, question: bool) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    // Position of the last `*` seen and the text position it currently covers up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] != '*' && (p[pi] == t[ti] || (question && p[pi] == '?')) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    fn check(pattern: &str, text: &str, question: bool, expected: bool) {
        assert_eq!(
            glob_match(pattern, text, question),
            expected,
            "glob_match({pattern:?}, {text:?}, {question})"
        );
    }

    #[test]
    fn table() {
        for (p, t, q, e) in [
            ("web-*", "web-1", true, true),
            ("web-*", "web-", true, true),
            ("web-*", "db-1", true, false),
            ("*", "", true, true),
            ("", "", true, true),
            ("", "a", true, false),
            ("a*b*c", "axxbyyc", true, true),
            ("a*b*c", "axxbyy", true, false),
            ("web-?", "web-1", true, true),
            ("web-?", "web-12", true, false),
            ("web-?", "web-1", false, false),
            ("web-?", "web-?", false, true),
            ("*x", "xxxx", true, true),
            ("slack:T0001:*", "slack:T0001:U1", false, true),
            ("slack:T0001:*", "slack:T0002:U1", false, false),
        ] {
            check(p, t, q, e);
        }
    }
}
