//! Leases of an embedded store (sled, redb): one process holds the
//! database file, so grants live in memory (a [`Grant`] per lease, under
//! one mutex: each check and its write are one step) and end with the
//! process — a controller restarted after kill -9 leads at once, not after
//! the dead one's TTL. Only each lease's term is stored (`meta` record
//! `lease/NAME`, by the backend), so terms keep growing across restarts.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::layout::{ms, now_ms};
use super::{Fence, Lease, StoreError};

/// A grant of this open: holder, term, expiry in Unix milliseconds.
#[derive(Debug, Clone)]
struct Grant {
    holder: String,
    term: u64,
    expires_ms: u64,
}

/// What is stored of a lease: its last term.
#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    term: u64,
}

/// The `meta` key of lease `name`'s term.
pub(crate) fn term_key(name: &str) -> Vec<u8> {
    format!("lease/{name}").into_bytes()
}

pub(crate) fn encode_term(term: u64) -> Vec<u8> {
    serde_json::to_vec(&Stored { term }).expect("a lease serializes to JSON")
}

/// The lease name of a `meta` key made by [`term_key`].
pub(crate) fn name_of_term_key(key: &[u8]) -> Option<String> {
    std::str::from_utf8(key.strip_prefix(b"lease/")?)
        .ok()
        .map(str::to_owned)
}

/// The term in a stored value. Records of an earlier version held holder
/// and expiry too: only the term is read.
pub(crate) fn decode_term(name: &str, v: &[u8]) -> Result<u64, StoreError> {
    serde_json::from_slice::<Stored>(v)
        .map(|s| s.term)
        .map_err(|e| StoreError::Corrupt {
            key: format!("meta/lease/{name}"),
            reason: e.to_string(),
        })
}

/// The grants of one open, by lease name.
#[derive(Debug, Default)]
pub(crate) struct LocalLeases(Mutex<HashMap<String, Grant>>);

type Grants<'a> = MutexGuard<'a, HashMap<String, Grant>>;

fn fence_holds(grants: &Grants<'_>, fence: &Fence) -> bool {
    grants.get(&fence.lease).is_some_and(|l| {
        l.holder == fence.holder && l.term == fence.term && l.expires_ms > now_ms()
    })
}

impl LocalLeases {
    fn lock(&self) -> Grants<'_> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `LeaseStore::lease_acquire`, with the backend's reads and writes of
    /// the stored term.
    pub(crate) fn acquire(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
        stored_term: impl FnOnce() -> Result<u64, StoreError>,
        store_term: impl FnOnce(u64) -> Result<(), StoreError>,
    ) -> Result<Option<Lease>, StoreError> {
        let mut grants = self.lock();
        let now = now_ms();
        let term = match grants.get(name) {
            Some(l) if l.expires_ms > now && l.holder == holder => l.term,
            Some(l) if l.expires_ms > now => return Ok(None),
            Some(l) => l.term + 1,
            None => stored_term()? + 1,
        };
        store_term(term)?;
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

    /// Sets the expiry of `holder`'s lease at `term` (`ttl` from now: a
    /// renewal; `None`: a release); `false`, and nothing changed, when it
    /// is not held so.
    pub(crate) fn extend(
        &self,
        name: &str,
        holder: &str,
        term: u64,
        ttl: Option<Duration>,
    ) -> bool {
        let mut grants = self.lock();
        let fence = Fence {
            lease: name.to_owned(),
            holder: holder.to_owned(),
            term,
        };
        if !fence_holds(&grants, &fence) {
            return false;
        }
        if let Some(g) = grants.get_mut(name) {
            g.expires_ms = ttl.map_or(0, |t| now_ms().saturating_add(ms(t)));
        }
        true
    }

    /// The unexpired lease on `name`, if any.
    pub(crate) fn holder(&self, name: &str) -> Option<Lease> {
        self.lock()
            .get(name)
            .filter(|l| l.expires_ms > now_ms())
            .map(|l| Lease {
                holder: l.holder.clone(),
                term: l.term,
            })
    }

    /// `LeaseStore::prune_leases` over the stored lease names `names`
    /// (those with the prefix): removes with `remove` each one whose grant
    /// ended `ended_for` ago or that this open never granted, and its
    /// grant, holding the grants meanwhile (no acquisition in between).
    pub(crate) fn prune(
        &self,
        names: Vec<String>,
        ended_for: Duration,
        mut remove: impl FnMut(&str) -> Result<(), StoreError>,
    ) -> Result<u64, StoreError> {
        let mut grants = self.lock();
        let before = now_ms().saturating_sub(ms(ended_for));
        let mut pruned = 0;
        for name in names {
            if grants.get(&name).is_some_and(|g| g.expires_ms > before) {
                continue;
            }
            remove(&name)?;
            grants.remove(&name);
            pruned += 1;
        }
        Ok(pruned)
    }

    /// Runs `write` only while `fence` is the current, unexpired grant,
    /// holding the grants meanwhile; `false`: refused, nothing written.
    pub(crate) fn fenced(
        &self,
        fence: &Fence,
        write: impl FnOnce() -> Result<(), StoreError>,
    ) -> Result<bool, StoreError> {
        let grants = self.lock();
        if !fence_holds(&grants, fence) {
            return Ok(false);
        }
        write()?;
        Ok(true)
    }
}
