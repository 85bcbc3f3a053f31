//! Presence on sled: tree `presence`, controller → written-at in Unix
//! milliseconds (8 bytes, big-endian), a settling byte, then the agents'
//! names separated by newlines (a name never holds one). One controller
//! writes a sled store; the trees are there so the conformance suite holds
//! for every backend. Tree `agent_live`: agent → written-at (8 bytes), the
//! controller's name's length (2 bytes, big-endian), the name, the data.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::super::{AgentLive, Presence, PresenceStore, StoreError};
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
        self.forget_old_presence(&tree)
    }

    fn touch_presence(&self, controller: &str, settling: bool) -> Result<bool, StoreError> {
        let tree = &self.trees()?.presence;
        let Some(old) = tree.get(controller.as_bytes()).map_err(|e| self.fail(e))? else {
            return Ok(false);
        };
        if old.len() < 9 {
            return Ok(false);
        }
        let mut v = now_ms().to_be_bytes().to_vec();
        v.push(u8::from(settling));
        v.extend_from_slice(&old[9..]);
        tree.insert(controller.as_bytes(), v)
            .map_err(|e| self.fail(e))?;
        self.forget_old_presence(tree)?;
        Ok(true)
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

    fn put_agents_live(&self, rows: &[AgentLive]) -> Result<(), StoreError> {
        let tree = &self.trees()?.agent_live;
        let now = now_ms().to_be_bytes();
        for r in rows {
            let name = r.controller.as_bytes();
            let len = u16::try_from(name.len()).map_err(|_| {
                StoreError::Backend(format!("controller name of {} bytes", name.len()))
            })?;
            let mut v = Vec::with_capacity(10 + name.len() + r.data.len());
            v.extend_from_slice(&now);
            v.extend_from_slice(&len.to_be_bytes());
            v.extend_from_slice(name);
            v.extend_from_slice(&r.data);
            tree.insert(r.agent.as_bytes(), v)
                .map_err(|e| self.fail(e))?;
        }
        Ok(())
    }

    fn agents_live(&self, since: Option<Duration>) -> Result<Vec<AgentLive>, StoreError> {
        let tree = &self.trees()?.agent_live;
        let from = since.map_or(0, |d| {
            now_ms().saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        });
        let mut out = Vec::new();
        for kv in tree.iter() {
            let (k, v) = kv.map_err(|e| self.fail(e))?;
            if written_at(&v) < from {
                continue;
            }
            let agent = String::from_utf8_lossy(&k).into_owned();
            let corrupt = |reason: &str| StoreError::Corrupt {
                key: format!("agent_live/{agent}"),
                reason: reason.to_owned(),
            };
            let len = v
                .get(8..10)
                .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
                .ok_or_else(|| corrupt("shorter than its header"))?;
            let name = v
                .get(10..10 + len)
                .ok_or_else(|| corrupt("shorter than its controller name"))?;
            out.push(AgentLive {
                controller: std::str::from_utf8(name)
                    .map_err(|e| corrupt(&e.to_string()))?
                    .to_owned(),
                data: v[10 + len..].to_vec(),
                agent,
            });
        }
        Ok(out)
    }
}

impl SledStore {
    /// Removes the entries not written for `FORGET_MS`.
    fn forget_old_presence(&self, tree: &sled::Tree) -> Result<(), StoreError> {
        let now = now_ms();
        for kv in tree.iter() {
            let (k, v) = kv.map_err(|e| self.fail(e))?;
            if written_at(&v).saturating_add(FORGET_MS) < now {
                tree.remove(&k).map_err(|e| self.fail(e))?;
            }
        }
        Ok(())
    }
}

/// The write time stored at the start of `v` (0 when too short).
fn written_at(v: &[u8]) -> u64 {
    v.get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}
