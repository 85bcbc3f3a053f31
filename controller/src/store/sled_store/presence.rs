//! Presence on sled: tree `presence`, controller → its entry, and tree
//! `agent_live`, agent → its live row (values as `layout` writes them).
//! One controller writes a sled store; the trees are there so the
//! conformance suite holds for every backend.

use std::time::Duration;

use super::super::layout::{
    FORGET_PRESENCE_MS, decode_live, decode_presence, live_value, ms, now_ms, presence_agents,
    presence_value, written_at,
};
use super::super::{AgentLive, Presence, PresenceStore, StoreError};
use super::SledStore;

impl PresenceStore for SledStore {
    fn put_presence(&self, entry: &Presence) -> Result<(), StoreError> {
        let tree = self.trees()?.presence.clone();
        let v = presence_value(now_ms(), entry.settling, entry.agents.join("\n").as_bytes());
        tree.insert(entry.controller.as_bytes(), v)
            .map_err(|e| self.fail(e))?;
        self.forget_old_presence(&tree)
    }

    fn touch_presence(&self, controller: &str, settling: bool) -> Result<bool, StoreError> {
        let tree = &self.trees()?.presence;
        let Some(old) = tree.get(controller.as_bytes()).map_err(|e| self.fail(e))? else {
            return Ok(false);
        };
        let Some(agents) = presence_agents(&old) else {
            return Ok(false);
        };
        tree.insert(
            controller.as_bytes(),
            presence_value(now_ms(), settling, agents),
        )
        .map_err(|e| self.fail(e))?;
        self.forget_old_presence(tree)?;
        Ok(true)
    }

    fn presence(&self, fresh: Duration) -> Result<Vec<Presence>, StoreError> {
        let tree = &self.trees()?.presence;
        let since = now_ms().saturating_sub(ms(fresh));
        let mut out = Vec::new();
        for kv in tree.iter() {
            let (k, v) = kv.map_err(|e| self.fail(e))?;
            out.extend(decode_presence(&k, &v, since)?);
        }
        Ok(out)
    }

    fn put_agents_live(&self, rows: &[AgentLive]) -> Result<(), StoreError> {
        let tree = &self.trees()?.agent_live;
        let now = now_ms();
        for r in rows {
            tree.insert(r.agent.as_bytes(), live_value(now, r)?)
                .map_err(|e| self.fail(e))?;
        }
        Ok(())
    }

    fn agents_live(&self, since: Option<Duration>) -> Result<Vec<AgentLive>, StoreError> {
        let tree = &self.trees()?.agent_live;
        let from = since.map_or(0, |d| now_ms().saturating_sub(ms(d)));
        let mut out = Vec::new();
        for kv in tree.iter() {
            let (k, v) = kv.map_err(|e| self.fail(e))?;
            out.extend(decode_live(&k, &v, from)?);
        }
        Ok(out)
    }
}

impl SledStore {
    /// Removes the entries not written for `FORGET_PRESENCE_MS`.
    fn forget_old_presence(&self, tree: &sled::Tree) -> Result<(), StoreError> {
        let now = now_ms();
        for kv in tree.iter() {
            let (k, v) = kv.map_err(|e| self.fail(e))?;
            if written_at(&v).saturating_add(FORGET_PRESENCE_MS) < now {
                tree.remove(&k).map_err(|e| self.fail(e))?;
            }
        }
        Ok(())
    }
}
