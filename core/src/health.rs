//! Service health, pure: the state of a service from its
//! instances' check results, and the alerting decisions made from a series
//! of those states (flap damping, deduplication, reminders).
//!
//! Time is passed in (Unix milliseconds), so every rule is tested without
//! sleeping. The controller feeds [`Alerting::observe`] on a timer and turns
//! its [`Decision`]s into chat messages and integration calls.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

/// A service's state, in order of badness (`Ok` best).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServiceState {
    Ok,
    /// No instance matched, or nothing reported yet.
    Unknown,
    /// Some instances fail (the "1 of 2 instances down" case).
    Degraded,
    /// Too few instances pass.
    Down,
}

impl ServiceState {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceState::Ok => "ok",
            ServiceState::Unknown => "unknown",
            ServiceState::Degraded => "degraded",
            ServiceState::Down => "down",
        }
    }

    pub fn parse(s: &str) -> Option<ServiceState> {
        Some(match s {
            "ok" => ServiceState::Ok,
            "unknown" => ServiceState::Unknown,
            "degraded" => ServiceState::Degraded,
            "down" => ServiceState::Down,
            _ => return None,
        })
    }

    /// Worst first, for listings: down, degraded, unknown, ok.
    pub fn severity(self) -> u8 {
        match self {
            ServiceState::Ok => 0,
            ServiceState::Unknown => 1,
            ServiceState::Degraded => 2,
            ServiceState::Down => 3,
        }
    }
}

impl fmt::Display for ServiceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A percentage threshold, `0%`–`100%`, parsed from config text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Percent(u8);

impl Percent {
    pub fn parse(s: &str) -> Result<Percent, String> {
        let n = s
            .trim()
            .strip_suffix('%')
            .ok_or_else(|| format!("{s:?} is not a percentage like \"50%\""))?;
        match n.trim().parse::<u8>() {
            Ok(v) if v <= 100 => Ok(Percent(v)),
            _ => Err(format!("{s:?} is not a percentage from 0% to 100%")),
        }
    }

    pub fn get(self) -> u8 {
        self.0
    }
}

/// When a service is degraded or down, from the share of its instances
/// whose check passes: `down` below `down_below`, `degraded` below
/// `degraded_below`, else `ok`. With the defaults (100% and 50%), one
/// failing instance of two is `degraded` and two of two `down`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    pub degraded_below: Percent,
    pub down_below: Percent,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            degraded_below: Percent(100),
            down_below: Percent(50),
        }
    }
}

/// The state for `passing` instances out of `total`. No instances at all
/// is `unknown` (a selector that matches nothing is a config problem, not
/// an outage).
pub fn evaluate(passing: u32, total: u32, t: Thresholds) -> ServiceState {
    if total == 0 {
        return ServiceState::Unknown;
    }
    // passing/total < p/100  ⇔  100·passing < p·total (no float rounding).
    let below = |p: Percent| u64::from(passing) * 100 < u64::from(p.0) * u64::from(total);
    if below(t.down_below) {
        ServiceState::Down
    } else if below(t.degraded_below) {
        ServiceState::Degraded
    } else {
        ServiceState::Ok
    }
}

/// How alerts for one service are damped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Damping {
    /// A new state must hold this long before it is announced; a blip
    /// shorter than this produces no message at all.
    pub confirm: Duration,
    /// Window over which state changes are counted for flap detection.
    pub flap_window: Duration,
    /// This many raw changes within `flap_window` make the service
    /// `flapping`: one message, then nothing until it settles.
    pub flap_threshold: u32,
    /// While announced as not ok, repeat the alert this often (zero = never).
    pub remind: Duration,
}

impl Default for Damping {
    fn default() -> Self {
        Damping {
            confirm: Duration::from_secs(20),
            flap_window: Duration::from_secs(600),
            flap_threshold: 6,
            remind: Duration::from_secs(4 * 3600),
        }
    }
}

/// What to tell the humans.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The announced state changed.
    Transition {
        from: ServiceState,
        to: ServiceState,
    },
    /// Still `state` after the reminder interval.
    Reminder { state: ServiceState },
    /// Started flapping: `changes` raw changes within the window.
    Flapping { changes: u32 },
}

/// The alerting state of one service: what was last announced and what the
/// raw evaluations have been doing since.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alerting {
    announced: ServiceState,
    announced_at_ms: u64,
    /// The latest raw state and since when it has held.
    raw: ServiceState,
    raw_since_ms: u64,
    /// Times of raw changes within the flap window, oldest first.
    changes: VecDeque<u64>,
    flapping: bool,
    last_reminder_ms: u64,
}

impl Alerting {
    /// Starts from a state already announced (e.g. restored from the store
    /// after a restart), so the same state is not announced twice.
    pub fn new(announced: ServiceState, announced_at_ms: u64) -> Alerting {
        Alerting {
            announced,
            announced_at_ms,
            raw: announced,
            raw_since_ms: announced_at_ms,
            changes: VecDeque::new(),
            flapping: false,
            last_reminder_ms: announced_at_ms,
        }
    }

    pub fn announced(&self) -> ServiceState {
        self.announced
    }

    pub fn announced_at_ms(&self) -> u64 {
        self.announced_at_ms
    }

    pub fn flapping(&self) -> bool {
        self.flapping
    }

    /// Feeds one evaluation at `now_ms`; returns what to announce, if
    /// anything. Call it regularly (not only on change): confirmation,
    /// settling and reminders are driven by time passing.
    pub fn observe(&mut self, raw: ServiceState, now_ms: u64, d: &Damping) -> Option<Decision> {
        let window = d.flap_window.as_millis() as u64;
        if raw != self.raw {
            self.raw = raw;
            self.raw_since_ms = now_ms;
            self.changes.push_back(now_ms);
        }
        while self
            .changes
            .front()
            .is_some_and(|&t| now_ms.saturating_sub(t) > window)
        {
            self.changes.pop_front();
        }
        let changes = self.changes.len() as u32;
        let stable_for = now_ms.saturating_sub(self.raw_since_ms);
        let confirmed = stable_for >= d.confirm.as_millis() as u64;

        if self.flapping {
            // Settled: the state held for the confirm time and the change
            // rate fell below the threshold. Then announce where it ended.
            if confirmed && changes < d.flap_threshold {
                self.flapping = false;
            } else {
                return None;
            }
        } else if d.flap_threshold > 0 && changes >= d.flap_threshold {
            self.flapping = true;
            return Some(Decision::Flapping { changes });
        }

        if self.raw != self.announced && confirmed {
            let from = self.announced;
            self.announced = self.raw;
            self.announced_at_ms = now_ms;
            self.last_reminder_ms = now_ms;
            return Some(Decision::Transition { from, to: self.raw });
        }
        if self.announced != ServiceState::Ok
            && self.raw == self.announced
            && !d.remind.is_zero()
            && now_ms.saturating_sub(self.last_reminder_ms) >= d.remind.as_millis() as u64
        {
            self.last_reminder_ms = now_ms;
            return Some(Decision::Reminder {
                state: self.announced,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ServiceState::*;

    fn pct(s: &str) -> Percent {
        Percent::parse(s).expect("valid percentage in test")
    }

    #[test]
    fn state_from_passing_instances() {
        let default = Thresholds::default();
        let check = |passing, total, t: Thresholds, want| {
            assert_eq!(evaluate(passing, total, t), want, "{passing}/{total} {t:?}");
        };
        check(2, 2, default, Ok);
        check(1, 2, default, Degraded);
        check(0, 2, default, Down);
        check(0, 0, default, Unknown);
        check(2, 3, default, Degraded);
        check(1, 3, default, Down);
        let lenient = Thresholds {
            degraded_below: pct("75%"),
            down_below: pct("25%"),
        };
        check(3, 4, lenient, Ok);
        check(2, 4, lenient, Degraded);
        check(1, 4, lenient, Degraded);
        check(0, 4, lenient, Down);
        let never_down = Thresholds {
            degraded_below: pct("100%"),
            down_below: pct("0%"),
        };
        check(0, 5, never_down, Degraded);
    }

    #[test]
    fn percentages() {
        assert_eq!(pct("50%").get(), 50);
        assert_eq!(pct(" 100% ").get(), 100);
        for bad in ["50", "101%", "-1%", "x%", ""] {
            assert!(Percent::parse(bad).is_err(), "{bad:?}");
        }
    }

    const S: u64 = 1000;

    fn damping() -> Damping {
        Damping {
            confirm: Duration::from_secs(20),
            flap_window: Duration::from_secs(600),
            flap_threshold: 4,
            remind: Duration::from_secs(3600),
        }
    }

    /// Feeds `(second, raw state)` steps, one evaluation per second in
    /// between, and returns the decisions with their second.
    fn run(start: ServiceState, steps: &[(u64, ServiceState)], until: u64) -> Vec<(u64, Decision)> {
        let d = damping();
        let mut a = Alerting::new(start, 0);
        let mut out = Vec::new();
        let mut raw = start;
        for t in 0..=until {
            if let Some(&(_, s)) = steps.iter().find(|(at, _)| *at == t) {
                raw = s;
            }
            if let Some(dec) = a.observe(raw, t * S, &d) {
                out.push((t, dec));
            }
        }
        out
    }

    #[test]
    fn a_change_is_announced_once_after_it_held_for_the_confirm_time() {
        let got = run(Ok, &[(10, Degraded)], 100);
        assert_eq!(
            got,
            [(
                30,
                Decision::Transition {
                    from: Ok,
                    to: Degraded
                }
            )]
        );
    }

    #[test]
    fn a_blip_shorter_than_the_confirm_time_says_nothing() {
        assert_eq!(run(Ok, &[(10, Down), (15, Ok)], 100), []);
    }

    #[test]
    fn degraded_then_down_then_recovered_is_three_messages() {
        let got = run(Ok, &[(10, Degraded), (100, Down), (200, Ok)], 300);
        let kinds: Vec<_> = got.iter().map(|(t, d)| (*t, *d)).collect();
        assert_eq!(
            kinds,
            [
                (
                    30,
                    Decision::Transition {
                        from: Ok,
                        to: Degraded
                    }
                ),
                (
                    120,
                    Decision::Transition {
                        from: Degraded,
                        to: Down
                    }
                ),
                (220, Decision::Transition { from: Down, to: Ok }),
            ]
        );
    }

    #[test]
    fn flapping_is_announced_once_then_held_until_it_settles() {
        // Changes every 30 s, each confirmed before the next.
        let flaps = |last| {
            vec![
                (10, Down),
                (40, Ok),
                (70, Down),
                (100, Ok),
                (130, Down),
                (160, Ok),
                (190, last),
            ]
        };
        let first_four = [
            (30, Decision::Transition { from: Ok, to: Down }),
            (60, Decision::Transition { from: Down, to: Ok }),
            (90, Decision::Transition { from: Ok, to: Down }),
            (100, Decision::Flapping { changes: 4 }),
        ];
        // Ends down, which is what was last announced: nothing more.
        assert_eq!(run(Ok, &flaps(Down), 1500), first_four);
        // Ends ok (160 s was the last change): announced once it settles,
        // when fewer than 4 changes are left in the 600 s window (the
        // change at 70 s leaves it at 671 s).
        let mut want = first_four.to_vec();
        want.push((671, Decision::Transition { from: Down, to: Ok }));
        assert_eq!(run(Ok, &flaps(Ok), 1500), want);
    }

    #[test]
    fn reminders_repeat_while_not_ok_and_stop_at_recovery() {
        let got = run(Ok, &[(0, Down), (8000, Ok)], 9000);
        let reminders: Vec<u64> = got
            .iter()
            .filter(|(_, d)| matches!(d, Decision::Reminder { .. }))
            .map(|(t, _)| *t)
            .collect();
        assert_eq!(reminders, [20 + 3600, 20 + 7200]);
        assert_eq!(
            got.last().map(|(_, d)| *d),
            Some(Decision::Transition { from: Down, to: Ok })
        );
    }

    #[test]
    fn a_restored_state_is_not_announced_again() {
        assert_eq!(run(Degraded, &[], 100), []);
    }
}
