//! Presence on redb: table `presence`, controller → its entry, and table
//! `agent_live`, agent → its live row (values as `layout` writes them).
//! One controller writes a redb store; the tables are there so the
//! conformance suite holds for every backend.

use std::time::Duration;

use redb::ReadableTable;

use super::super::layout::{
    FORGET_PRESENCE_MS, decode_live, decode_presence, live_value, ms, now_ms, presence_agents,
    presence_value, written_at,
};
use super::super::{AgentLive, Presence, PresenceStore, StoreError};
use super::{AGENT_LIVE, Fail, PRESENCE, RedbStore, bytes_in};

/// Removes the entries not written for `FORGET_PRESENCE_MS`.
fn forget_old(t: &mut redb::Table<'_, &'static [u8], &'static [u8]>) -> Result<(), Fail> {
    let now = now_ms();
    t.retain(|_, v| written_at(v).saturating_add(FORGET_PRESENCE_MS) >= now)?;
    Ok(())
}

impl PresenceStore for RedbStore {
    fn put_presence(&self, entry: &Presence) -> Result<(), StoreError> {
        let v = presence_value(now_ms(), entry.settling, entry.agents.join("\n").as_bytes());
        self.write(|tx| {
            let mut t = tx.open_table(PRESENCE)?;
            t.insert(entry.controller.as_bytes(), v.as_slice())?;
            forget_old(&mut t)
        })
    }

    fn touch_presence(&self, controller: &str, settling: bool) -> Result<bool, StoreError> {
        self.write(|tx| {
            let mut t = tx.open_table(PRESENCE)?;
            let Some(old) = bytes_in(&t, controller.as_bytes())? else {
                return Ok(false);
            };
            let Some(agents) = presence_agents(&old) else {
                return Ok(false);
            };
            let v = presence_value(now_ms(), settling, agents);
            t.insert(controller.as_bytes(), v.as_slice())?;
            forget_old(&mut t)?;
            Ok(true)
        })
    }

    fn presence(&self, fresh: Duration) -> Result<Vec<Presence>, StoreError> {
        let since = now_ms().saturating_sub(ms(fresh));
        self.read(|tx| {
            let mut out = Vec::new();
            for kv in tx.open_table(PRESENCE)?.iter()? {
                let (k, v) = kv?;
                out.extend(decode_presence(k.value(), v.value(), since)?);
            }
            Ok(out)
        })
    }

    fn put_agents_live(&self, rows: &[AgentLive]) -> Result<(), StoreError> {
        let now = now_ms();
        self.write(|tx| {
            let mut t = tx.open_table(AGENT_LIVE)?;
            for r in rows {
                t.insert(r.agent.as_bytes(), live_value(now, r)?.as_slice())?;
            }
            Ok(())
        })
    }

    fn agents_live(&self, since: Option<Duration>) -> Result<Vec<AgentLive>, StoreError> {
        let from = since.map_or(0, |d| now_ms().saturating_sub(ms(d)));
        self.read(|tx| {
            let mut out = Vec::new();
            for kv in tx.open_table(AGENT_LIVE)?.iter()? {
                let (k, v) = kv?;
                out.extend(decode_live(k.value(), v.value(), from)?);
            }
            Ok(out)
        })
    }
}
