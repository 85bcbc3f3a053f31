//! JIDs (`local@domain/resource`), parsed strictly enough that an identity
//! built from one is unambiguous: no whitespace or control characters, no
//! characters RFC 7622 forbids in a localpart, and lowercased local and
//! domain parts (servers compare them case-insensitively).

use std::fmt;

/// A JID; `resource` is `None` for a bare JID.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Jid {
    pub local: Option<String>,
    pub domain: String,
    pub resource: Option<String>,
}

/// Why a JID was refused.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[error("invalid JID \"{input}\": {reason}")]
pub struct JidError {
    pub input: String,
    pub reason: &'static str,
}

const MAX_PART: usize = 1023;

impl Jid {
    /// Parses `[local@]domain[/resource]`.
    pub fn parse(s: &str) -> Result<Jid, JidError> {
        let err = |reason| JidError {
            input: s.chars().take(80).collect(),
            reason,
        };
        let (rest, resource) = match s.split_once('/') {
            Some((r, res)) => (r, Some(res)),
            None => (s, None),
        };
        let (local, domain) = match rest.rsplit_once('@') {
            Some((l, d)) => (Some(l), d),
            None => (None, rest),
        };
        let bad = |p: &str| p.chars().any(|c| c.is_whitespace() || c.is_control());
        let domain = domain.strip_suffix('.').unwrap_or(domain);
        if domain.is_empty() || domain.len() > MAX_PART {
            return Err(err("the domain must have 1 to 1023 bytes"));
        }
        if bad(domain) || (domain.contains(['@', '/', ':', '[', ']']) && !domain.starts_with('[')) {
            return Err(err("the domain has characters not allowed in a host name"));
        }
        if let Some(l) = local {
            if l.is_empty() || l.len() > MAX_PART {
                return Err(err("the localpart must have 1 to 1023 bytes"));
            }
            if bad(l) || l.contains(['"', '&', '\'', '/', ':', '<', '>', '@']) {
                return Err(err("the localpart has characters RFC 7622 forbids"));
            }
        }
        if let Some(r) = resource
            && (r.is_empty() || r.len() > MAX_PART || r.chars().any(char::is_control))
        {
            return Err(err(
                "the resource must have 1 to 1023 bytes, no control characters",
            ));
        }
        Ok(Jid {
            local: local.map(str::to_lowercase),
            domain: domain.to_lowercase(),
            resource: resource.map(str::to_string),
        })
    }

    /// This JID without its resource.
    pub fn bare(&self) -> Jid {
        Jid {
            resource: None,
            ..self.clone()
        }
    }

    /// This bare JID with `resource`.
    pub fn with_resource(&self, resource: &str) -> Jid {
        Jid {
            resource: Some(resource.to_string()),
            ..self.clone()
        }
    }

    /// Whether this is a bare JID.
    pub fn is_bare(&self) -> bool {
        self.resource.is_none()
    }
}

impl fmt::Display for Jid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(l) = &self.local {
            write!(f, "{l}@")?;
        }
        f.write_str(&self.domain)?;
        if let Some(r) = &self.resource {
            write!(f, "/{r}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<&str, &str>) {
        let got = Jid::parse(input)
            .map(|j| j.to_string())
            .map_err(|e| e.reason);
        match (got, expected) {
            (Ok(g), Ok(e)) => assert_eq!(g, e, "{input}"),
            (Err(g), Err(e)) => assert!(g.contains(e), "{input}: {g}"),
            (g, e) => panic!("{input}: got {g:?}, expected {e:?}"),
        }
    }

    #[test]
    fn parses_and_normalises() {
        check("Alice@LocalHost", Ok("alice@localhost"));
        check(
            "alice@localhost/Res/with/slash",
            Ok("alice@localhost/Res/with/slash"),
        );
        check(
            "ops@conference.localhost/alice@evil",
            Ok("ops@conference.localhost/alice@evil"),
        );
        check("localhost", Ok("localhost"));
        check("localhost.", Ok("localhost"));
        check("@localhost", Err("localpart"));
        check("a b@localhost", Err("localpart"));
        check("a<b@localhost", Err("localpart"));
        check("alice@", Err("domain"));
        check("alice@local host", Err("domain"));
        check("alice@localhost/", Err("resource"));
        check("alice@localhost/\u{7}", Err("resource"));
    }

    #[test]
    fn bare_drops_the_resource() {
        let j = Jid::parse("room@conference.localhost/nick").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(j.bare().to_string(), "room@conference.localhost");
        assert!(!j.is_bare() && j.bare().is_bare());
        assert_eq!(
            j.bare().with_resource("x").to_string(),
            "room@conference.localhost/x"
        );
    }
}
