//! Presence in PostgreSQL: one row per controller, replaced by each write
//! and stamped with the database's clock, so freshness does not depend on
//! the controllers' clocks.

use std::time::Duration;

use super::super::{Presence, PresenceStore, StoreError};
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
}
