//! Per-key windows for events that are recorded up to a cap and counted
//! beyond it (failed authentications, forged chat requests), so a flood
//! cannot flood the audit trail. Pure: the caller passes the time.

use std::collections::HashMap;
use std::hash::Hash;

/// Records at most `per_window` events per key and window; counts the rest.
#[derive(Debug)]
pub struct WindowLimiter<K> {
    per_window: u32,
    window_ms: u64,
    max_keys: usize,
    /// Per key: window start, recorded in the window, suppressed since the
    /// last recorded one.
    windows: HashMap<K, (u64, u32, u64)>,
}

impl<K: Eq + Hash> WindowLimiter<K> {
    pub fn new(per_window: u32, window_ms: u64, max_keys: usize) -> WindowLimiter<K> {
        WindowLimiter {
            per_window,
            window_ms,
            max_keys,
            windows: HashMap::new(),
        }
    }

    /// `Some(n)` when this event is to be recorded (`n` = events of the same
    /// key suppressed since its last record); `None` to only count it.
    pub fn admit(&mut self, key: K, now_ms: u64) -> Option<u64> {
        if self.windows.len() >= self.max_keys && !self.windows.contains_key(&key) {
            let window = self.window_ms;
            self.windows
                .retain(|_, (start, _, _)| now_ms.saturating_sub(*start) < window);
            if self.windows.len() >= self.max_keys {
                self.windows.clear();
            }
        }
        let w = self.windows.entry(key).or_insert((now_ms, 0, 0));
        if now_ms.saturating_sub(w.0) >= self.window_ms {
            w.0 = now_ms;
            w.1 = 0;
        }
        if w.1 < self.per_window {
            w.1 += 1;
            Some(std::mem::take(&mut w.2))
        } else {
            w.2 += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_up_to_the_cap_then_counts_and_reports_the_count_next_window() {
        let mut l = WindowLimiter::new(10, 60_000, 100);
        let recorded = (0..100).filter(|_| l.admit("a", 1_000).is_some()).count();
        assert_eq!(recorded, 10);
        // Another key has its own allowance.
        assert_eq!(l.admit("b", 1_000), Some(0));
        // Next window: the first record carries what was suppressed.
        assert_eq!(l.admit("a", 61_000), Some(90));
        assert_eq!(l.admit("a", 61_001), Some(0));
    }

    #[test]
    fn the_key_table_is_bounded() {
        let mut l = WindowLimiter::new(1, 60_000, 3);
        for k in 0..10u32 {
            assert_eq!(l.admit(k, 0), Some(0));
        }
        assert!(l.windows.len() <= 3);
    }
}
