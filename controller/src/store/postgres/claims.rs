//! Claims in PostgreSQL: one row per key; a claim is one statement that
//! inserts the key or takes over an expired row, deciding expiry with the
//! database's clock. Two claims of one key are ordered by the row (the
//! second waits for the first to commit, then sees it unexpired).

use std::time::Duration;

use super::super::{ClaimStore, StoreError};
use super::PostgresStore;
use crate::claims::ClaimKey;

fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

impl ClaimStore for PostgresStore {
    fn claim(&self, key: &ClaimKey, ttl: Duration) -> Result<bool, StoreError> {
        let rows = self.query(
            "INSERT INTO claims (key, expires_at)
             VALUES ($1, now() + $2::bigint * interval '1 millisecond')
             ON CONFLICT (key) DO UPDATE SET expires_at = EXCLUDED.expires_at
             WHERE claims.expires_at <= now()
             RETURNING 1",
            params![key.as_str().to_owned(), ttl_ms(ttl)],
        )?;
        Ok(!rows.is_empty())
    }

    fn prune_claims(&self) -> Result<u64, StoreError> {
        self.execute("DELETE FROM claims WHERE expires_at <= now()", params![])
    }
}
