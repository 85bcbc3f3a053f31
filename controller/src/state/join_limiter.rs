//! Failed joins counted per source address, so a join token cannot be
//! guessed by hammering `Join` (it could not anyway: 256-bit secrets) and a
//! broken installer cannot flood the audit trail.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::lock;
use crate::error::{ApiError, ApiResult};

/// Failed joins allowed per source address and minute, so a token cannot be
/// guessed by hammering `Join` (it could not anyway: 256-bit secrets), and a
/// broken installer cannot flood the audit trail.
pub const JOIN_FAILURES_PER_MINUTE: u32 = 10;

/// Counts failed joins per source address in one-minute windows.
#[derive(Default)]
pub struct JoinLimiter {
    failures: Mutex<HashMap<std::net::IpAddr, (u32, Instant)>>,
}

impl JoinLimiter {
    /// Refuses a join from `ip` that has failed too often in the window.
    pub fn check(&self, ip: std::net::IpAddr) -> ApiResult<()> {
        let mut map = lock(&self.failures);
        map.retain(|_, (_, since)| since.elapsed() < Duration::from_secs(60));
        match map.get(&ip) {
            Some((n, since)) if *n >= JOIN_FAILURES_PER_MINUTE => {
                Err(ApiError::ResourceExhausted(format!(
                    "too many failed joins from {ip}; retry in {}s",
                    60u64.saturating_sub(since.elapsed().as_secs())
                )))
            }
            _ => Ok(()),
        }
    }

    pub fn failed(&self, ip: std::net::IpAddr) {
        let mut map = lock(&self.failures);
        let e = map.entry(ip).or_insert((0, Instant::now()));
        e.0 += 1;
    }
}
