//! The controllers an agent knows (`controller` or `controllers` in
//! agent.toml, `join --controller` given once or more) and which one it
//! dials next. Pure: no sockets, no clock.
//!
//! Every controller in the list serves the same fleet (one database, one
//! CA): the agent's pinned CA, key and certificate are the same whichever
//! it reaches. It dials the first; when a connection ends or cannot be
//! made it waits its backoff and dials the next, wrapping around, and
//! stays with the one that answers. "The next" after the first is spread:
//! the others are tried in list order rotated by a hash of the agent's
//! name, so when a controller stops, its agents spread over the others
//! instead of all moving to the one listed after it.

/// Most controller addresses an agent keeps.
pub const MAX_CONTROLLERS: usize = 16;

/// A non-empty list of distinct, parsed controller addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Controllers(Vec<String>);

impl Controllers {
    /// Parses `urls`; each problem names its `key[index]` (or `key` when
    /// `urls` is empty).
    pub fn parse(key: &str, urls: &[String]) -> Result<Controllers, Vec<String>> {
        let mut problems = Vec::new();
        if urls.is_empty() {
            problems.push(format!(
                "{key}: at least one controller address, e.g. [\"https://ctl-a.example.com:7443\", \"https://ctl-b.example.com:7443\"]"
            ));
        }
        if urls.len() > MAX_CONTROLLERS {
            problems.push(format!(
                "{key}: {} addresses, at most {MAX_CONTROLLERS}",
                urls.len()
            ));
        }
        for (i, url) in urls.iter().enumerate() {
            if let Err(e) = check(url) {
                problems.push(format!("{key}[{i}]: {e}"));
            } else if let Some(first) = urls[..i].iter().position(|u| u == url) {
                problems.push(format!("{key}[{i}]: {url:?} repeats {key}[{first}]"));
            }
        }
        if problems.is_empty() {
            Ok(Controllers(urls.to_vec()))
        } else {
            Err(problems)
        }
    }

    /// One controller (agent.toml's `controller`); a problem is named
    /// `controller`.
    pub fn one(url: &str) -> Result<Controllers, Vec<String>> {
        check(url)
            .map(|()| Controllers(vec![url.to_owned()]))
            .map_err(|e| vec![format!("controller: {e}")])
    }

    pub fn urls(&self) -> &[String] {
        &self.0
    }

    pub fn first(&self) -> &str {
        &self.0[0]
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

fn check(url: &str) -> Result<(), String> {
    if url.trim().is_empty() {
        return Err("empty, e.g. \"https://ctl.example.com:7443\"".into());
    }
    fleetcmd_proto::channel::controller_url(url)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Which controller the agent dials: the first, then after every ended or
/// failed connection the next one in its order, wrapping around.
#[derive(Debug, Clone)]
pub struct Rotation {
    controllers: Controllers,
    /// Indexes into `controllers`: the first, then the others rotated by
    /// the agent's spread.
    order: Vec<usize>,
    at: usize,
}

impl Rotation {
    /// `agent`: the agent's name, which spreads the order of the others.
    pub fn new(controllers: Controllers, agent: &str) -> Rotation {
        let mut rest: Vec<usize> = (1..controllers.len()).collect();
        if !rest.is_empty() {
            let by = (spread(agent) % rest.len() as u64) as usize;
            rest.rotate_left(by);
        }
        let mut order = vec![0];
        order.extend(rest);
        Rotation {
            controllers,
            order,
            at: 0,
        }
    }

    /// The address to dial now.
    pub fn current(&self) -> &str {
        &self.controllers.0[self.order[self.at]]
    }

    /// The connection to `current` ended or could not be made: move on.
    pub fn advance(&mut self) {
        self.at = (self.at + 1) % self.order.len();
    }
}

/// A stable hash of the agent's name (FNV-1a): the same agent keeps its
/// order across restarts and versions.
fn spread(agent: &str) -> u64 {
    agent.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn addresses_are_checked_each_with_its_index() {
        // (addresses, Ok(count) or the pieces every error must contain)
        type Case<'a> = (&'a [&'a str], Result<usize, &'a [&'a str]>);
        let cases: &[Case] = &[
            (&["https://a:7443"], Ok(1)),
            (&["https://a:7443", "https://b:7443"], Ok(2)),
            (&[], Err(&["controllers: at least one controller address"])),
            (&["https://a:7443", " "], Err(&["controllers[1]: empty"])),
            (&["https://a:7443", "ftp://b"], Err(&["controllers[1]: "])),
            (
                &["https://a:7443", "https://b:7443", "https://a:7443"],
                Err(&["controllers[2]: \"https://a:7443\" repeats controllers[0]"]),
            ),
        ];
        for (list, want) in cases {
            match (Controllers::parse("controllers", &urls(list)), want) {
                (Ok(c), Ok(n)) => assert_eq!(c.len(), *n, "{list:?}"),
                (Err(problems), Err(pieces)) => {
                    let text = problems.join("\n");
                    for piece in *pieces {
                        assert!(text.contains(piece), "{list:?}: {text}");
                    }
                }
                (got, want) => panic!("{list:?}: got {got:?}, want {want:?}"),
            }
        }
        let many: Vec<String> = (0..=MAX_CONTROLLERS)
            .map(|i| format!("https://c{i}:7443"))
            .collect();
        let e = Controllers::parse("controllers", &many).expect_err("too many");
        assert!(e.join("\n").contains("17 addresses, at most 16"), "{e:?}");
    }

    #[test]
    fn rotation_starts_with_the_first_tries_every_other_once_and_wraps() {
        let list = Controllers::parse(
            "controllers",
            &urls(&["https://a:1", "https://b:1", "https://c:1", "https://d:1"]),
        )
        .expect("valid");
        for agent in ["web-1", "web-2", "db-7", ""] {
            let mut r = Rotation::new(list.clone(), agent);
            let mut seen = vec![r.current().to_owned()];
            for _ in 0..4 {
                r.advance();
                seen.push(r.current().to_owned());
            }
            assert_eq!(seen[0], "https://a:1", "{agent}: {seen:?}");
            assert_eq!(seen[4], "https://a:1", "{agent}: wraps: {seen:?}");
            let mut others = seen[1..4].to_vec();
            others.sort();
            assert_eq!(others, urls(&["https://b:1", "https://c:1", "https://d:1"]));
            // Stable: the same agent, the same order.
            let mut again = Rotation::new(list.clone(), agent);
            again.advance();
            assert_eq!(again.current(), seen[1], "{agent}");
        }
        let mut single = Rotation::new(Controllers::one("https://a:1").expect("valid"), "x");
        single.advance();
        assert_eq!(single.current(), "https://a:1");
    }

    /// When the first controller stops, its agents spread over the others:
    /// of 900 agents listing a, b, c, each of b and c is next for about
    /// half (found by the kill test: all of a stopped controller's agents
    /// moved to the one listed after it).
    #[test]
    fn the_agents_of_a_stopped_controller_spread_over_the_others() {
        let list = Controllers::parse(
            "controllers",
            &urls(&["https://a:1", "https://b:1", "https://c:1"]),
        )
        .expect("valid");
        let mut next = std::collections::BTreeMap::<String, usize>::new();
        for i in 0..900 {
            let mut r = Rotation::new(list.clone(), &format!("sim-{i}"));
            r.advance();
            *next.entry(r.current().to_owned()).or_default() += 1;
        }
        assert_eq!(next.len(), 2, "{next:?}");
        for (url, n) in &next {
            assert!((350..=550).contains(n), "{url}: {n} of 900 ({next:?})");
        }
    }
}
