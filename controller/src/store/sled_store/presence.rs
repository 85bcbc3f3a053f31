//! Presence on sled: tree `presence`, controller → written-at in Unix
//! milliseconds (8 bytes, big-endian), a settling byte, then the agents'
//! names separated by newlines (a name never holds one). One controller
//! writes a sled store; the tree is there so the conformance suite holds
//! for every backend.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::super::{Presence, PresenceStore, StoreError};
use super::SledStore;

/// Entries not written for this long are removed.
const FORGET_MS: u64 = 24 * 3600 * 1000;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl PresenceStore for SledStore {
    fn put_presence(&self, entry: &Presence) -> Result<(), StoreError> {
        let tree = self.trees()?.presence.clone();
        let mut v = now_ms().to_be_bytes().to_vec();
        v.push(u8::from(entry.settling));
        v.extend_from_slice(entry.agents.join("\n").as_bytes());
        tree.insert(entry.controller.as_bytes(), v)
            .map_err(|e| self.fail(e))?;
        let now = now_ms();
        for kv in tree.iter() {
            let (k, v) = kv.map_err(|e| self.fail(e))?;
            if written_at(&v).saturating_add(FORGET_MS) < now {
                tree.remove(&k).map_err(|e| self.fail(e))?;
            }
        }
        Ok(())
    }

    fn presence(&self, fresh: Duration) -> Result<Vec<Presence>, StoreError> {
        let tree = &self.trees()?.presence;
        let since = now_ms().saturating_sub(u64::try_from(fresh.as_millis()).unwrap_or(u64::MAX));
        let mut out = Vec::new();
        for kv in tree.iter() {
            let (k, v) = kv.map_err(|e| self.fail(e))?;
            if v.len() < 9 || written_at(&v) < since {
                continue;
            }
            let key = String::from_utf8_lossy(&k).into_owned();
            let names = std::str::from_utf8(&v[9..]).map_err(|e| StoreError::Corrupt {
                key: format!("presence/{key}"),
                reason: e.to_string(),
            })?;
            out.push(Presence {
                controller: key,
                settling: v[8] != 0,
                agents: names
                    .split('\n')
                    .filter(|n| !n.is_empty())
                    .map(str::to_owned)
                    .collect(),
            });
        }
        Ok(out)
    }
}

/// The write time stored at the start of `v` (0 when too short).
fn written_at(v: &[u8]) -> u64 {
    v.get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}
