//! Claims on sled: tree `claims`, key → expiry in Unix milliseconds (8
//! bytes, big-endian). A claim reads the key and writes it with
//! compare-and-swap, so of concurrent claims one wins and the others see
//! its write.

use std::time::Duration;

use super::super::layout::{claim_expiry, claim_value, ms, now_ms};
use super::super::{ClaimStore, StoreError};
use super::SledStore;
use crate::claims::ClaimKey;

impl ClaimStore for SledStore {
    fn claim(&self, key: &ClaimKey, ttl: Duration) -> Result<bool, StoreError> {
        let tree = self.trees()?.claims.clone();
        let k = key.as_str().as_bytes();
        loop {
            let now = now_ms();
            let old = tree.get(k).map_err(|e| self.fail(e))?;
            if old.as_deref().is_some_and(|v| claim_expiry(v) > now) {
                return Ok(false);
            }
            let until = claim_value(now.saturating_add(ms(ttl)));
            match tree
                .compare_and_swap(k, old.as_deref(), Some(&until[..]))
                .map_err(|e| self.fail(e))?
            {
                Ok(()) => return Ok(true),
                // Another claim wrote it between our read and our write:
                // decide again on what it wrote.
                Err(_) => continue,
            }
        }
    }

    fn prune_claims(&self) -> Result<u64, StoreError> {
        let tree = self.trees()?.claims.clone();
        let now = now_ms();
        let mut pruned = 0;
        for kv in tree.iter() {
            let (k, v) = kv.map_err(|e| self.fail(e))?;
            // Only the expired value: a claim that took the key over
            // meanwhile stays.
            if claim_expiry(&v) <= now
                && tree
                    .compare_and_swap(&k, Some(&v), None as Option<&[u8]>)
                    .map_err(|e| self.fail(e))?
                    .is_ok()
            {
                pruned += 1;
            }
        }
        Ok(pruned)
    }
}
