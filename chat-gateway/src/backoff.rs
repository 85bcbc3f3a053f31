//! Exponential backoff with jitter: the one shape every reconnect loop
//! (Slack Socket Mode, Mattermost WebSocket, IRC, XMPP, Matrix `/sync`)
//! and every retried HTTP request (PagerDuty, Opsgenie, Statuspage,
//! outgoing webhooks, Campfire posts) waits by, so that a
//! restarted server is not hit by every gateway at the same moment.

use std::time::Duration;

/// How the wait is spread around its nominal value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Jitter {
    /// × [0.8, 1.2]: reconnects (the gRPC connection-backoff shape the
    /// agents use too).
    PlusMinus20,
    /// × [0.5, 1]: retries, which also honour a server's `Retry-After`.
    HalfToFull,
}

/// `first` × `factor`ⁿ after `n` failures, capped at `max`, then jittered.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    pub first: Duration,
    pub factor: f64,
    pub max: Duration,
    pub jitter: Jitter,
}

impl Backoff {
    /// Reconnects: 1 s × 1.6ⁿ, at most 60 s, ±20 %.
    pub const RECONNECT: Backoff = Backoff {
        first: Duration::from_secs(1),
        factor: 1.6,
        max: Duration::from_secs(60),
        jitter: Jitter::PlusMinus20,
    };

    /// The wait after `n` failures (0: the first wait), with `unit` in
    /// [0, 1] choosing where in the jitter range it falls.
    ///
    /// ```
    /// use std::time::Duration;
    /// use fleetcmd_gateway::backoff::Backoff;
    /// assert_eq!(Backoff::RECONNECT.delay_with(0, 0.5), Duration::from_secs(1));
    /// assert_eq!(Backoff::RECONNECT.delay_with(99, 0.5), Duration::from_secs(60));
    /// ```
    pub fn delay_with(&self, n: u32, unit: f64) -> Duration {
        let raw = self.first.as_secs_f64() * self.factor.powi(n.min(30) as i32);
        let capped = raw.min(self.max.as_secs_f64());
        let unit = unit.clamp(0.0, 1.0);
        let spread = match self.jitter {
            Jitter::PlusMinus20 => 0.8 + 0.4 * unit,
            Jitter::HalfToFull => 0.5 + 0.5 * unit,
        };
        Duration::from_secs_f64(capped * spread)
    }

    /// The wait after `n` failures, jittered at random.
    pub fn delay(&self, n: u32) -> Duration {
        self.delay_with(n, random_unit())
    }
}

/// A random fraction in [0, 1); 0.5 (no jitter) if the system has no
/// randomness to give.
pub fn random_unit() -> f64 {
    let mut b = [0u8; 4];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_spreads() {
        let check = |b: Backoff, n: u32, unit: f64, want_ms: u64| {
            assert_eq!(
                b.delay_with(n, unit).as_millis(),
                u128::from(want_ms),
                "{b:?} n={n} unit={unit}"
            );
        };
        let r = Backoff::RECONNECT;
        check(r, 0, 0.5, 1000);
        check(r, 0, 0.0, 800);
        check(r, 0, 1.0, 1200);
        check(r, 1, 0.5, 1600);
        check(r, 50, 0.5, 60_000);
        check(r, 50, 1.0, 72_000);
        let retry = Backoff {
            first: Duration::from_millis(500),
            factor: 2.0,
            max: Duration::from_secs(60),
            jitter: Jitter::HalfToFull,
        };
        check(retry, 0, 1.0, 500);
        check(retry, 0, 0.0, 250);
        check(retry, 3, 1.0, 4000);
        check(retry, 40, 1.0, 60_000);
        // Out-of-range units are clamped, never a negative or huge wait.
        check(r, 0, -3.0, 800);
        check(r, 0, 7.0, 1200);
        for _ in 0..100 {
            let u = random_unit();
            assert!((0.0..1.0).contains(&u), "{u}");
        }
    }
}
