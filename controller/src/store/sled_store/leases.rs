//! Leases on sled: one process holds the database, so grants live in
//! memory (a [`Grant`] per lease, under one mutex: each check and its write
//! are one step) and end with the process; only the term is stored (`meta`
//! record `lease/NAME`), so terms keep growing across restarts.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleetcmd_core::audit::SignedHead;
use serde::{Deserialize, Serialize};

use super::super::{ExportCursor, Fence, Lease, LeaseStore, StoreError};
use super::{SledStore, seq_key};

/// A grant of this open: holder, term, expiry in Unix milliseconds.
#[derive(Debug, Clone)]
pub(crate) struct Grant {
    holder: String,
    term: u64,
    expires_ms: u64,
}

/// What is stored of a lease: its last term.
#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    term: u64,
}

type Grants<'a> = std::sync::MutexGuard<'a, std::collections::HashMap<String, Grant>>;

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
    /// The last term granted for `name`, by any open.
    fn stored_term(&self, name: &str) -> Result<u64, StoreError> {
        let Some(v) = self
            .trees()?
            .meta
            .get(key(name))
            .map_err(|e| self.fail(e))?
        else {
            return Ok(0);
        };
        // Records of an earlier version held holder and expiry too: only
        // the term is read.
        serde_json::from_slice::<Stored>(&v)
            .map(|s| s.term)
            .map_err(|e| StoreError::Corrupt {
                key: format!("meta/lease/{name}"),
                reason: e.to_string(),
            })
    }

    fn store_term(&self, name: &str, term: u64) -> Result<(), StoreError> {
        let json = serde_json::to_vec(&Stored { term }).expect("a lease serializes to JSON");
        self.insert(&self.trees()?.meta, &key(name), json)
    }

    /// Whether `fence` is the current, unexpired grant.
    fn fence_holds(grants: &Grants<'_>, fence: &Fence) -> bool {
        grants.get(&fence.lease).is_some_and(|l| {
            l.holder == fence.holder && l.term == fence.term && l.expires_ms > now_ms()
        })
    }

    /// Sets the expiry of `holder`'s lease at `term` (a renewal, or 0: a
    /// release); `false`, and nothing changed, when it is not held so.
    fn lease_extend(
        &self,
        name: &str,
        holder: &str,
        term: u64,
        expires_ms: u64,
    ) -> Result<bool, StoreError> {
        let mut grants = self.lease_lock();
        let fence = Fence {
            lease: name.to_owned(),
            holder: holder.to_owned(),
            term,
        };
        if !Self::fence_holds(&grants, &fence) {
            return Ok(false);
        }
        if let Some(g) = grants.get_mut(name) {
            g.expires_ms = expires_ms;
        }
        Ok(true)
    }

    fn lease_lock(&self) -> Grants<'_> {
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
        let mut grants = self.lease_lock();
        let now = now_ms();
        let term = match grants.get(name) {
            Some(l) if l.expires_ms > now && l.holder == holder => l.term,
            Some(l) if l.expires_ms > now => return Ok(None),
            Some(l) => l.term + 1,
            None => self.stored_term(name)? + 1,
        };
        self.store_term(name, term)?;
        grants.insert(
            name.to_owned(),
            Grant {
                holder: holder.to_owned(),
                term,
                expires_ms: now.saturating_add(ms(ttl)),
            },
        );
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
        Ok(self
            .lease_lock()
            .get(name)
            .filter(|l| l.expires_ms > now_ms())
            .map(|l| Lease {
                holder: l.holder.clone(),
                term: l.term,
            }))
    }

    fn audit_put_head_fenced(&self, fence: &Fence, head: &SignedHead) -> Result<bool, StoreError> {
        let grants = self.lease_lock();
        if !Self::fence_holds(&grants, fence) {
            return Ok(false);
        }
        let json = serde_json::to_vec(head).expect("signed heads serialize to JSON");
        self.insert(&self.trees()?.audit_heads, &seq_key(head.seq), json)?;
        Ok(true)
    }

    fn put_export_cursor_fenced(
        &self,
        fence: &Fence,
        name: &str,
        cursor: ExportCursor,
    ) -> Result<bool, StoreError> {
        let grants = self.lease_lock();
        if !Self::fence_holds(&grants, fence) {
            return Ok(false);
        }
        let mut v = cursor.records.to_be_bytes().to_vec();
        v.extend_from_slice(&cursor.heads.to_be_bytes());
        self.insert(&self.trees()?.export_cursors, name.as_bytes(), v)?;
        Ok(true)
    }

    fn export_cursor(&self, name: &str) -> Result<Option<ExportCursor>, StoreError> {
        let Some(v) = self
            .trees()?
            .export_cursors
            .get(name.as_bytes())
            .map_err(|e| self.fail(e))?
        else {
            return Ok(None);
        };
        let n = |at: usize| {
            v.get(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| StoreError::Corrupt {
                    key: format!("export_cursors/{name}"),
                    reason: format!("{} bytes, expected 16", v.len()),
                })
        };
        Ok(Some(ExportCursor {
            records: n(0)?,
            heads: n(8)?,
        }))
    }
}
