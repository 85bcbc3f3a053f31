//! Presence in PostgreSQL: one row per controller, replaced by each write
//! and stamped with the database's clock, so freshness does not depend on
//! the controllers' clocks.

use std::time::Duration;

use super::super::{AgentLive, Presence, PresenceStore, StoreError};
use super::PostgresStore;

impl PresenceStore for PostgresStore {
    fn put_presence(&self, entry: &Presence) -> Result<(), StoreError> {
        self.execute(
            "WITH forgotten AS (
                 DELETE FROM presence WHERE written_at < now() - interval '1 day'
             )
             INSERT INTO presence (controller, settling, agents, written_at)
             VALUES ($1, $2, $3, now())
             ON CONFLICT (controller) DO UPDATE SET settling = EXCLUDED.settling,
               agents = EXCLUDED.agents, written_at = EXCLUDED.written_at",
            params![
                entry.controller.clone(),
                entry.settling,
                entry.agents.clone()
            ],
        )
        .map(drop)
    }

    fn touch_presence(&self, controller: &str, settling: bool) -> Result<bool, StoreError> {
        let n = self.execute(
            "WITH forgotten AS (
                 DELETE FROM presence WHERE written_at < now() - interval '1 day'
             )
             UPDATE presence SET settling = $2, written_at = now() WHERE controller = $1",
            params![controller.to_owned(), settling],
        )?;
        Ok(n == 1)
    }

    fn presence(&self, fresh: Duration) -> Result<Vec<Presence>, StoreError> {
        let fresh_ms = i64::try_from(fresh.as_millis()).unwrap_or(i64::MAX);
        Ok(self
            .query(
                "SELECT controller, settling, agents FROM presence
                 WHERE written_at > now() - $1::bigint * interval '1 millisecond'
                 ORDER BY controller",
                params![fresh_ms],
            )?
            .iter()
            .map(|r| Presence {
                controller: r.get(0),
                settling: r.get(1),
                agents: r.get(2),
            })
            .collect())
    }

    fn put_agents_live(&self, rows: &[AgentLive]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let agents: Vec<String> = rows.iter().map(|r| r.agent.clone()).collect();
        let controllers: Vec<String> = rows.iter().map(|r| r.controller.clone()).collect();
        let data: Vec<Vec<u8>> = rows.iter().map(|r| r.data.clone()).collect();
        self.execute(
            "INSERT INTO agent_live (agent, controller, data, written_at)
             SELECT a, c, d, now() FROM unnest($1::text[], $2::text[], $3::bytea[]) AS u(a, c, d)
             ON CONFLICT (agent) DO UPDATE SET controller = EXCLUDED.controller,
               data = EXCLUDED.data, written_at = EXCLUDED.written_at",
            params![agents, controllers, data],
        )
        .map(drop)
    }

    fn agents_live(&self, since: Option<Duration>) -> Result<Vec<AgentLive>, StoreError> {
        let since_ms = since.map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        Ok(self
            .query(
                "SELECT agent, controller, data FROM agent_live
                 WHERE $1::bigint IS NULL
                    OR written_at > now() - $1::bigint * interval '1 millisecond'
                 ORDER BY agent",
                params![since_ms],
            )?
            .iter()
            .map(|r| AgentLive {
                agent: r.get(0),
                controller: r.get(1),
                data: r.get(2),
            })
            .collect())
    }
}
