//! Leases on sled: one process holds the database, so a mutex makes each
//! check and its write one step. A lease is a `meta` record
//! (`lease/NAME`: holder, term, expiry in Unix milliseconds of this
//! machine's clock); terms survive a restart.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleetcmd_core::audit::SignedHead;
use serde::{Deserialize, Serialize};

use super::super::{Fence, Lease, LeaseStore, StoreError};
use super::{SledStore, seq_key};

#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    holder: String,
    term: u64,
    expires_ms: u64,
}

fn key(name: &str) -> Vec<u8> {
    format!("lease/{name}").into_bytes()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl SledStore {
    fn lease_get(&self, name: &str) -> Result<Option<Stored>, StoreError> {
        let Some(v) = self
            .trees()?
            .meta
            .get(key(name))
            .map_err(|e| self.fail(e))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                key: format!("meta/lease/{name}"),
                reason: e.to_string(),
            })
    }

    fn lease_put(&self, name: &str, rec: &Stored) -> Result<(), StoreError> {
        let json = serde_json::to_vec(rec).expect("a lease serializes to JSON");
        self.insert(&self.trees()?.meta, &key(name), json)
    }

    /// Whether `fence` is the current, unexpired grant (the caller holds
    /// the lease mutex).
    fn fence_holds(&self, fence: &Fence) -> Result<bool, StoreError> {
        Ok(self.lease_get(&fence.lease)?.is_some_and(|l| {
            l.holder == fence.holder && l.term == fence.term && l.expires_ms > now_ms()
        }))
    }

    /// Sets the expiry of `holder`'s lease at `term` (a renewal, or 0: a
    /// release); `false`, and nothing written, when it is not held so.
    fn lease_extend(
        &self,
        name: &str,
        holder: &str,
        term: u64,
        expires_ms: u64,
    ) -> Result<bool, StoreError> {
        let _turn = self.lease_lock();
        let fence = Fence {
            lease: name.to_owned(),
            holder: holder.to_owned(),
            term,
        };
        if !self.fence_holds(&fence)? {
            return Ok(false);
        }
        self.lease_put(
            name,
            &Stored {
                holder: holder.to_owned(),
                term,
                expires_ms,
            },
        )?;
        Ok(true)
    }

    fn lease_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl LeaseStore for SledStore {
    fn lease_acquire(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let _turn = self.lease_lock();
        let now = now_ms();
        let term = match self.lease_get(name)? {
            None => 1,
            Some(l) if l.expires_ms > now && l.holder == holder => l.term,
            Some(l) if l.expires_ms > now => return Ok(None),
            Some(l) => l.term + 1,
        };
        self.lease_put(
            name,
            &Stored {
                holder: holder.to_owned(),
                term,
                expires_ms: now.saturating_add(ms(ttl)),
            },
        )?;
        Ok(Some(Lease {
            holder: holder.to_owned(),
            term,
        }))
    }

    fn lease_renew(
        &self,
        name: &str,
        holder: &str,
        term: u64,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.lease_extend(name, holder, term, now_ms().saturating_add(ms(ttl)))
    }

    fn lease_release(&self, name: &str, holder: &str, term: u64) -> Result<bool, StoreError> {
        self.lease_extend(name, holder, term, 0)
    }

    fn lease_holder(&self, name: &str) -> Result<Option<Lease>, StoreError> {
        let _turn = self.lease_lock();
        Ok(self
            .lease_get(name)?
            .filter(|l| l.expires_ms > now_ms())
            .map(|l| Lease {
                holder: l.holder,
                term: l.term,
            }))
    }

    fn audit_put_head_fenced(&self, fence: &Fence, head: &SignedHead) -> Result<bool, StoreError> {
        let _turn = self.lease_lock();
        if !self.fence_holds(fence)? {
            return Ok(false);
        }
        let json = serde_json::to_vec(head).expect("signed heads serialize to JSON");
        self.insert(&self.trees()?.audit_heads, &seq_key(head.seq), json)?;
        Ok(true)
    }
}
