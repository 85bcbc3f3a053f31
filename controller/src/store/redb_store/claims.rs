//! Claims on redb: table `claims`, key → expiry (as `layout` writes it).
//! A claim reads and writes the key in one write transaction, so of
//! concurrent claims one wins.

use std::time::Duration;

use redb::ReadableTable;

use super::super::layout::{claim_expiry, claim_value, ms, now_ms};
use super::super::{ClaimStore, StoreError};
use super::{CLAIMS, RedbStore};
use crate::claims::ClaimKey;

impl ClaimStore for RedbStore {
    fn claim(&self, key: &ClaimKey, ttl: Duration) -> Result<bool, StoreError> {
        let k = key.as_str().as_bytes();
        self.write(|tx| {
            let mut t = tx.open_table(CLAIMS)?;
            let now = now_ms();
            if t.get(k)?.is_some_and(|v| claim_expiry(v.value()) > now) {
                return Ok(false);
            }
            t.insert(k, &claim_value(now.saturating_add(ms(ttl)))[..])?;
            Ok(true)
        })
    }

    fn prune_claims(&self) -> Result<u64, StoreError> {
        self.write(|tx| {
            let now = now_ms();
            let mut pruned = 0;
            tx.open_table(CLAIMS)?.retain(|_, v| {
                let keep = claim_expiry(v) > now;
                pruned += u64::from(!keep);
                keep
            })?;
            Ok(pruned)
        })
    }
}
