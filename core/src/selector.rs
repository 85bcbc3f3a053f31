//! Kubernetes-style label selectors choosing which agents a job targets
//!: `role=web`, `env!=staging`, `role in (web,api)`,
//! `role notin (a,b)`, `canary`, `!canary`, comma = AND, the key `name` for
//! the agent's host name (globs `*`/`?` allowed), and `all`.

use std::collections::BTreeMap;
use std::fmt;

use crate::terminal::excerpt;

/// Why a selector or a label list was refused.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum SelectorError {
    #[error("empty selector; use `all` to target every agent")]
    Empty,
    #[error("invalid selector \"{input}\": {reason}")]
    Invalid { input: String, reason: String },
    #[error("invalid labels \"{input}\": {reason}")]
    Labels { input: String, reason: String },
}

/// One requirement; a selector is their conjunction.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    /// Values are sorted and deduplicated so equal sets compare equal.
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector. The requirement-less selector is `all`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

/// The key that selects on the agent's host name instead of a label.
pub const NAME_KEY: &str = "name";

pub(crate) fn valid_key(k: &str) -> bool {
    let b = k.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'/' | b'-'))
}

pub(crate) fn valid_value(v: &str, globs: bool) -> bool {
    v.len() <= 63
        && v.bytes().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(c, b'.' | b'_' | b'-')
                || (globs && matches!(c, b'*' | b'?'))
        })
}

impl Selector {
    /// The selector that matches every agent.
    pub fn all() -> Selector {
        Selector {
            requirements: Vec::new(),
        }
    }

    /// Whether this is `all`.
    pub fn is_all(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Parses a selector.
    ///
    /// ```
    /// use std::collections::BTreeMap;
    /// use fleetcmd_core::selector::Selector;
    /// let s = Selector::parse("role in (web,api), !canary, name=web-*").unwrap();
    /// let labels = BTreeMap::from([("role".to_string(), "web".to_string())]);
    /// assert!(s.matches("web-1", &labels));
    /// assert!(!s.matches("db-1", &labels));
    /// ```
    pub fn parse(s: &str) -> Result<Selector, SelectorError> {
        let input = excerpt(s);
        let err = |reason: String| SelectorError::Invalid {
            input: input.clone(),
            reason,
        };
        let trimmed = s.trim();
        if trimmed.is_empty() {
            return Err(SelectorError::Empty);
        }
        if trimmed == "all" {
            return Ok(Selector::all());
        }
        let mut parts = Vec::new();
        let mut depth = 0u32;
        let mut start = 0;
        for (i, c) in trimmed.char_indices() {
            match c {
                '(' if depth > 0 => return Err(err("nested parentheses".to_string())),
                '(' => depth += 1,
                ')' if depth == 0 => return Err(err("unbalanced `)`".to_string())),
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&trimmed[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        if depth != 0 {
            return Err(err("unbalanced `(`".to_string()));
        }
        parts.push(&trimmed[start..]);
        let mut requirements = Vec::new();
        for part in parts {
            requirements.push(parse_requirement(part.trim()).map_err(&err)?);
        }
        Ok(Selector { requirements })
    }

    /// Whether an agent with host name `name` and `labels` is selected.
    pub fn matches(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(name, labels))
    }

    /// Structural, conservative implication: true when every requirement of
    /// `other` appears verbatim in `self`, so every agent `self` selects is
    /// also selected by `other`. `all` is implied by everything; `all`
    /// implies only `all`.
    pub fn implies(&self, other: &Selector) -> bool {
        other
            .requirements
            .iter()
            .all(|r| self.requirements.contains(r))
    }
}

fn parse_requirement(part: &str) -> Result<Requirement, String> {
    let key = |k: &str| -> Result<String, String> {
        let k = k.trim();
        if k == "all" {
            return Err("`all` cannot be combined with other requirements".to_string());
        }
        if valid_key(k) {
            Ok(k.to_string())
        } else if k.is_empty() {
            Err("empty requirement (stray comma?)".to_string())
        } else {
            Err(format!(
                "invalid key `{}`: use 1-63 letters, digits, `.`, `_`, `/` or `-`, starting with a letter or digit",
                excerpt(k)
            ))
        }
    };
    let value = |k: &str, v: &str| -> Result<String, String> {
        let v = v.trim();
        let globs = k == NAME_KEY;
        if valid_value(v, globs) {
            Ok(v.to_string())
        } else if !globs && valid_value(v, true) {
            Err(format!(
                "globs are only allowed for the `{NAME_KEY}` key, not in `{}={}`",
                excerpt(k),
                excerpt(v)
            ))
        } else {
            Err(format!(
                "invalid value `{}`: use up to 63 letters, digits, `.`, `_` or `-`",
                excerpt(v)
            ))
        }
    };
    if let Some(rest) = part.strip_prefix('!')
        && !rest.contains('=')
    {
        return Ok(Requirement::NotExists(key(rest)?));
    }
    if let Some((k, v)) = part.split_once("!=") {
        let k = key(k)?;
        let v = value(&k, v)?;
        return Ok(Requirement::NotEq(k, v));
    }
    if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
        let k = key(k)?;
        let v = value(&k, v)?;
        return Ok(Requirement::Eq(k, v));
    }
    if let Some(open) = part.find('(') {
        let head = part[..open].trim();
        let (k, op) = head.rsplit_once(char::is_whitespace).ok_or_else(|| {
            format!(
                "expected `<key> in (...)` or `<key> notin (...)`, got `{}`",
                excerpt(part)
            )
        })?;
        let k = key(k)?;
        let body = part[open + 1..]
            .strip_suffix(')')
            .ok_or_else(|| format!("unexpected text after `)` in `{}`", excerpt(part)))?;
        let mut values = Vec::new();
        for v in body.split(',') {
            if v.trim().is_empty() {
                return Err(format!("empty value in set `({})`", excerpt(body)));
            }
            values.push(value(&k, v)?);
        }
        values.sort();
        values.dedup();
        return match op.trim() {
            "in" => Ok(Requirement::In(k, values)),
            "notin" => Ok(Requirement::NotIn(k, values)),
            other => Err(format!(
                "unknown operator `{}`; expected `in` or `notin`",
                excerpt(other)
            )),
        };
    }
    if part.contains(')') {
        return Err("unbalanced `)`".to_string());
    }
    Ok(Requirement::Exists(key(part)?))
}

impl Requirement {
    fn matches(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        let actual = |k: &str| -> Option<&str> {
            if k == NAME_KEY {
                Some(name)
            } else {
                labels.get(k).map(String::as_str)
            }
        };
        let eq = |k: &str, pattern: &str, v: &str| {
            if k == NAME_KEY {
                crate::glob::glob_match(pattern, v, true)
            } else {
                pattern == v
            }
        };
        match self {
            Requirement::Eq(k, want) => actual(k).is_some_and(|v| eq(k, want, v)),
            Requirement::NotEq(k, want) => !actual(k).is_some_and(|v| eq(k, want, v)),
            Requirement::In(k, set) => actual(k).is_some_and(|v| set.iter().any(|w| eq(k, w, v))),
            Requirement::NotIn(k, set) => {
                !actual(k).is_some_and(|v| set.iter().any(|w| eq(k, w, v)))
            }
            Requirement::Exists(k) => actual(k).is_some(),
            Requirement::NotExists(k) => actual(k).is_none(),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Requirement::Eq(k, v) => write!(f, "{k}={v}"),
            Requirement::NotEq(k, v) => write!(f, "{k}!={v}"),
            Requirement::In(k, vs) => write!(f, "{k} in ({})", vs.join(",")),
            Requirement::NotIn(k, vs) => write!(f, "{k} notin ({})", vs.join(",")),
            Requirement::Exists(k) => write!(f, "{k}"),
            Requirement::NotExists(k) => write!(f, "!{k}"),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("all");
        }
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Selector::parse(s)
    }
}

/// Parses `k=v,k2=v2` into labels (an empty string gives no labels).
/// Values are plain label values: globs are not allowed.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, SelectorError> {
    let input = excerpt(s);
    let err = |reason: String| SelectorError::Labels {
        input: input.clone(),
        reason,
    };
    let mut out = BTreeMap::new();
    if s.trim().is_empty() {
        return Ok(out);
    }
    for part in s.split(',') {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            err(format!(
                "expected `key=value`, got `{}`",
                excerpt(part.trim())
            ))
        })?;
        let (k, v) = (k.trim(), v.trim());
        if !valid_key(k) {
            return Err(err(format!(
                "invalid key `{}`: use 1-63 letters, digits, `.`, `_`, `/` or `-`, starting with a letter or digit",
                excerpt(k)
            )));
        }
        if k == NAME_KEY {
            return Err(err(format!("`{NAME_KEY}` is reserved for the host name")));
        }
        if !valid_value(v, false) {
            return Err(err(format!(
                "invalid value `{}` for `{}`: use up to 63 letters, digits, `.`, `_` or `-`",
                excerpt(v),
                excerpt(k)
            )));
        }
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(err(format!("key `{}` given twice", excerpt(k))));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(s: &str) -> BTreeMap<String, String> {
        match parse_labels(s) {
            Ok(l) => l,
            Err(e) => panic!("{e}"),
        }
    }

    /// `expected` is the canonical form, or `Err(substring of the error)`.
    fn check_parse(input: &str, expected: Result<&str, &str>) {
        let got = Selector::parse(input);
        match (&got, expected) {
            (Ok(sel), Ok(canon)) => {
                assert_eq!(sel.to_string(), canon, "canonical form of {input:?}");
                assert_eq!(
                    Selector::parse(canon).as_ref(),
                    Ok(sel),
                    "round trip of {input:?}"
                );
            }
            (Err(e), Err(part)) => assert!(e.to_string().contains(part), "{input:?}: {e}"),
            _ => panic!("{input:?}: got {got:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn parse_table() {
        check_parse("all", Ok("all"));
        check_parse("  all ", Ok("all"));
        check_parse("role=web", Ok("role=web"));
        check_parse("role==web", Ok("role=web"));
        check_parse(" role = web , env != staging ", Ok("role=web,env!=staging"));
        check_parse("role in (web,api)", Ok("role in (api,web)"));
        check_parse("role in ( web , api, web )", Ok("role in (api,web)"));
        check_parse("role in(web)", Ok("role in (web)"));
        check_parse(
            "role notin (a,b),canary,!gpu",
            Ok("role notin (a,b),canary,!gpu"),
        );
        check_parse("name=web-*", Ok("name=web-*"));
        check_parse("name in (web-?,db-*)", Ok("name in (db-*,web-?)"));
        check_parse(
            "topology.kubernetes.io/zone=eu-1",
            Ok("topology.kubernetes.io/zone=eu-1"),
        );
        check_parse("role=", Ok("role="));
        check_parse("", Err("empty selector; use `all`"));
        check_parse("   ", Err("empty selector"));
        check_parse("role=web,", Err("empty requirement"));
        check_parse(
            "role=web*",
            Err("globs are only allowed for the `name` key"),
        );
        check_parse("role in (web", Err("unbalanced `(`"));
        check_parse("role in web)", Err("unbalanced `)`"));
        check_parse("role in ((a))", Err("nested"));
        check_parse("role in ()", Err("empty value"));
        check_parse("role within (a)", Err("unknown operator"));
        check_parse("ro le=web", Err("invalid key"));
        check_parse("-role=web", Err("invalid key"));
        check_parse("role=we b", Err("invalid value"));
        check_parse("role=$(x)", Err("invalid value"));
        check_parse("all,role=web", Err("`all` cannot be combined"));
        check_parse(&format!("role={}", "a".repeat(64)), Err("invalid value"));
    }

    fn check_match(selector: &str, name: &str, lbls: &str, expected: bool) {
        let sel = match Selector::parse(selector) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(
            sel.matches(name, &labels(lbls)),
            expected,
            "{selector:?} on {name} {lbls}"
        );
    }

    #[test]
    fn match_table() {
        for (sel, name, lbls, e) in [
            ("all", "web-1", "", true),
            ("role=web", "web-1", "role=web", true),
            ("role=web", "web-1", "role=api", false),
            ("role=web", "web-1", "", false),
            ("env!=staging", "web-1", "env=prod", true),
            ("env!=staging", "web-1", "", true),
            ("env!=staging", "web-1", "env=staging", false),
            ("role in (web,api)", "x", "role=api", true),
            ("role in (web,api)", "x", "role=db", false),
            ("role in (web,api)", "x", "", false),
            ("role notin (web,api)", "x", "role=db", true),
            ("role notin (web,api)", "x", "", true),
            ("role notin (web,api)", "x", "role=web", false),
            ("canary", "x", "canary=", true),
            ("canary", "x", "", false),
            ("!canary", "x", "", true),
            ("!canary", "x", "canary=true", false),
            ("name=web-*", "web-1", "", true),
            ("name=web-*", "db-1", "", false),
            ("name=web-?", "web-12", "", false),
            ("name!=web-*", "db-1", "", true),
            ("name in (db-1,web-*)", "web-9", "", true),
            ("name", "anything", "", true),
            ("role=web,env=prod", "x", "role=web,env=prod", true),
            ("role=web,env=prod", "x", "role=web,env=dev", false),
        ] {
            check_match(sel, name, lbls, e);
        }
        // A label called `name` cannot impersonate the host name.
        let spoof = BTreeMap::from([("name".to_string(), "db".to_string())]);
        assert!(Selector::parse("name=web-1").is_ok_and(|s| s.matches("web-1", &spoof)));
        assert!(Selector::parse("name=db").is_ok_and(|s| !s.matches("web-1", &spoof)));
    }

    #[test]
    fn implication() {
        let p = |s: &str| Selector::parse(s).unwrap_or_else(|e| panic!("{e}"));
        assert!(p("role=web,env=prod").implies(&p("env=prod")));
        assert!(p("env==prod").implies(&p("env=prod")));
        assert!(!p("role=web").implies(&p("env=prod")));
        assert!(!p("all").implies(&p("env=prod")));
        assert!(p("role=web").implies(&p("all")));
        assert!(p("role in (b,a)").implies(&p("role in (a,b)")));
    }

    #[test]
    fn labels_table() {
        for (input, ok) in [
            ("", true),
            ("role=web", true),
            ("role=web, env=prod", true),
            ("role", false),
            ("role=web,role=api", false),
            ("name=x", false),
            ("role=web*", false),
            ("=x", false),
        ] {
            assert_eq!(parse_labels(input).is_ok(), ok, "{input:?}");
        }
        assert_eq!(labels("a=1, b=2").get("b").map(String::as_str), Some("2"));
    }
}

/// Property tests: selectors built from the grammar round-trip through
/// `Display`/`parse`, and `matches` agrees with a naive reference evaluator.
#[cfg(test)]
mod proptests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::{NAME_KEY, Selector};

    /// A requirement as generated; values of `in`/`notin` keep their order
    /// and duplicates, so normalization by the parser is exercised too.
    #[derive(Clone, Debug)]
    enum Req {
        Eq(String, String, bool), // bool: written as `==`
        NotEq(String, String),
        In(String, Vec<String>),
        NotIn(String, Vec<String>),
        Exists(String),
        NotExists(String),
    }

    /// A few keys that collide with the generated labels, plus random valid ones.
    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => prop::sample::select(vec!["role", "env", "tier", "topology.io/zone", "a-b_c", NAME_KEY])
                .prop_map(str::to_string),
            1 => "[a-z0-9][a-z0-9._/-]{0,8}".prop_filter("`all` is reserved", |k| k != "all"),
        ]
    }

    fn label_value() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => prop::sample::select(vec!["web", "api", "db", "prod", "x-1.2", "web-1"])
                .prop_map(str::to_string),
            1 => "[A-Za-z0-9._-]{0,6}",
        ]
    }

    /// Values for the `name` key may hold globs.
    fn value_for(k: &str) -> BoxedStrategy<String> {
        if k == NAME_KEY {
            prop_oneof![
                2 => label_value(),
                1 => "[a-z0-9.*?-]{0,6}",
            ]
            .boxed()
        } else {
            label_value().boxed()
        }
    }

    fn nonempty_value_for(k: &str) -> BoxedStrategy<String> {
        value_for(k)
            .prop_filter("set values are non-empty", |v| !v.is_empty())
            .boxed()
    }

    fn req() -> impl Strategy<Value = Req> {
        key().prop_flat_map(|k| {
            let k1 = k.clone();
            let k2 = k.clone();
            let k3 = k.clone();
            let k4 = k.clone();
            let k5 = k.clone();
            prop_oneof![
                (value_for(&k), any::<bool>()).prop_map(move |(v, dbl)| Req::Eq(
                    k1.clone(),
                    v,
                    dbl
                )),
                value_for(&k).prop_map(move |v| Req::NotEq(k2.clone(), v)),
                prop::collection::vec(nonempty_value_for(&k), 1..4)
                    .prop_map(move |vs| Req::In(k3.clone(), vs)),
                prop::collection::vec(nonempty_value_for(&k), 1..4)
                    .prop_map(move |vs| Req::NotIn(k4.clone(), vs)),
                Just(Req::Exists(k5.clone())),
                Just(Req::NotExists(k)),
            ]
        })
    }

    /// Optional blanks around tokens (what `parse` must tolerate).
    fn ws() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["", "", " ", "  ", "\t"])
    }

    /// Renders with the given blanks; `tight` gives the canonical form.
    fn render(reqs: &[Req], blanks: &[&'static str]) -> String {
        let mut b = blanks.iter().cycle();
        let mut w = || *b.next().unwrap_or(&"");
        let set = |vs: &[String], w: &mut dyn FnMut() -> &'static str| {
            vs.iter()
                .map(|v| format!("{}{v}{}", w(), w()))
                .collect::<Vec<_>>()
                .join(",")
        };
        reqs.iter()
            .map(|r| match r {
                Req::Eq(k, v, dbl) => {
                    format!(
                        "{}{k}{}{}{}{v}{}",
                        w(),
                        w(),
                        if *dbl { "==" } else { "=" },
                        w(),
                        w()
                    )
                }
                Req::NotEq(k, v) => format!("{}{k}{}!={}{v}{}", w(), w(), w(), w()),
                // `in`/`notin` need at least one blank between key and operator.
                Req::In(k, vs) => {
                    format!("{}{k} {}in{}({}){}", w(), w(), w(), set(vs, &mut w), w())
                }
                Req::NotIn(k, vs) => {
                    format!("{}{k} {}notin{}({}){}", w(), w(), w(), set(vs, &mut w), w())
                }
                Req::Exists(k) => format!("{}{k}{}", w(), w()),
                Req::NotExists(k) => format!("{}!{k}{}", w(), w()),
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    fn canonical(reqs: &[Req]) -> String {
        let set = |vs: &[String]| {
            let mut vs = vs.to_vec();
            vs.sort();
            vs.dedup();
            vs.join(",")
        };
        reqs.iter()
            .map(|r| match r {
                Req::Eq(k, v, _) => format!("{k}={v}"),
                Req::NotEq(k, v) => format!("{k}!={v}"),
                Req::In(k, vs) => format!("{k} in ({})", set(vs)),
                Req::NotIn(k, vs) => format!("{k} notin ({})", set(vs)),
                Req::Exists(k) => k.clone(),
                Req::NotExists(k) => format!("!{k}"),
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Naive recursive glob (`*` any run, `?` one char), independent of `crate::glob`.
    fn glob(p: &[char], t: &[char]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some('*'), _) => glob(&p[1..], t) || (!t.is_empty() && glob(p, &t[1..])),
            (Some('?'), Some(_)) => glob(&p[1..], &t[1..]),
            (Some(a), Some(b)) if a == b => glob(&p[1..], &t[1..]),
            _ => false,
        }
    }

    fn reference(reqs: &[Req], host: &str, labels: &BTreeMap<String, String>) -> bool {
        let get = |k: &str| -> Option<String> {
            if k == NAME_KEY {
                Some(host.to_string())
            } else {
                labels.get(k).cloned()
            }
        };
        let same = |k: &str, want: &str, have: &str| {
            if k == NAME_KEY {
                let p: Vec<char> = want.chars().collect();
                let t: Vec<char> = have.chars().collect();
                glob(&p, &t)
            } else {
                want == have
            }
        };
        reqs.iter().all(|r| match r {
            Req::Eq(k, v, _) => get(k).is_some_and(|h| same(k, v, &h)),
            Req::NotEq(k, v) => !get(k).is_some_and(|h| same(k, v, &h)),
            Req::In(k, vs) => get(k).is_some_and(|h| vs.iter().any(|v| same(k, v, &h))),
            Req::NotIn(k, vs) => !get(k).is_some_and(|h| vs.iter().any(|v| same(k, v, &h))),
            Req::Exists(k) => get(k).is_some(),
            Req::NotExists(k) => get(k).is_none(),
        })
    }

    fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
        prop::collection::btree_map(
            key().prop_filter("`name` is the host name, not a label", |k| k != NAME_KEY),
            label_value(),
            0..5,
        )
    }

    fn host() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec!["web-1", "web-12", "db-1", "api", ""])
                .prop_map(str::to_string),
            "[a-z0-9.-]{0,8}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        #[test]
        fn round_trip_and_matches_reference(
            reqs in prop::collection::vec(req(), 1..5),
            blanks in prop::collection::vec(ws(), 1..16),
            hosts in prop::collection::vec(host(), 1..4),
            label_sets in prop::collection::vec(labels(), 1..4),
        ) {
            let text = render(&reqs, &blanks);
            let sel = Selector::parse(&text)
                .map_err(|e| TestCaseError::fail(format!("{text:?} did not parse: {e}")))?;
            prop_assert_eq!(sel.to_string(), canonical(&reqs), "canonical form of {:?}", text);
            let again = Selector::parse(&sel.to_string())
                .map_err(|e| TestCaseError::fail(format!("{sel} did not re-parse: {e}")))?;
            prop_assert_eq!(&again, &sel);
            prop_assert!(!sel.is_all());
            for h in &hosts {
                for l in &label_sets {
                    prop_assert_eq!(
                        sel.matches(h, l),
                        reference(&reqs, h, l),
                        "selector {} on host {:?} labels {:?}", sel, h, l
                    );
                }
            }
        }

        /// Whatever `parse` accepts prints to a form that parses back to the same value.
        #[test]
        fn any_accepted_text_round_trips(text in "[a-z!=(), .*?\\t-]{0,30}") {
            if let Ok(sel) = Selector::parse(&text) {
                let printed = sel.to_string();
                prop_assert_eq!(Selector::parse(&printed), Ok(sel), "{:?} printed as {:?}", text, printed);
            }
        }
    }
}
