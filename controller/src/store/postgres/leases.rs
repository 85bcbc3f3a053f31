//! Leases in PostgreSQL: one row per lease name; every grant, renewal and
//! fenced write is one statement that decides expiry with the database's
//! clock (`now()`), so the controllers' clocks never matter and two
//! controllers racing for a lease are ordered by the row lock.

use std::time::Duration;

use fleetcmd_core::audit::SignedHead;
use tokio_postgres::types::Json;

use super::super::{ExportCursor, Fence, Lease, LeaseStore, StoreError};
use super::{PostgresStore, int, uint};

fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

impl LeaseStore for PostgresStore {
    fn lease_acquire(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        // Free (no row), expired, or mine: take it. The term stays while
        // the same holder's lease is running and grows at every new grant.
        let rows = self.query(
            "INSERT INTO leases (name, holder, term, expires_at)
             VALUES ($1, $2, 1, now() + $3::bigint * interval '1 millisecond')
             ON CONFLICT (name) DO UPDATE SET
                 term = CASE WHEN leases.holder = EXCLUDED.holder AND leases.expires_at > now()
                             THEN leases.term ELSE leases.term + 1 END,
                 holder = EXCLUDED.holder,
                 expires_at = EXCLUDED.expires_at
             WHERE leases.expires_at <= now() OR leases.holder = EXCLUDED.holder
             RETURNING term",
            params![name.to_owned(), holder.to_owned(), ttl_ms(ttl)],
        )?;
        rows.first()
            .map(|r| {
                Ok(Lease {
                    holder: holder.to_owned(),
                    term: uint(r.get(0), &format!("leases/{name}"))?,
                })
            })
            .transpose()
    }

    fn lease_renew(
        &self,
        name: &str,
        holder: &str,
        term: u64,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let n = self.execute(
            "UPDATE leases SET expires_at = now() + $4::bigint * interval '1 millisecond'
             WHERE name = $1 AND holder = $2 AND term = $3 AND expires_at > now()",
            params![
                name.to_owned(),
                holder.to_owned(),
                int(term, "lease term")?,
                ttl_ms(ttl)
            ],
        )?;
        Ok(n == 1)
    }

    fn lease_release(&self, name: &str, holder: &str, term: u64) -> Result<bool, StoreError> {
        let n = self.execute(
            "UPDATE leases SET expires_at = now()
             WHERE name = $1 AND holder = $2 AND term = $3 AND expires_at > now()",
            params![name.to_owned(), holder.to_owned(), int(term, "lease term")?],
        )?;
        Ok(n == 1)
    }

    fn lease_holder(&self, name: &str) -> Result<Option<Lease>, StoreError> {
        let rows = self.query(
            "SELECT holder, term FROM leases WHERE name = $1 AND expires_at > now()",
            params![name.to_owned()],
        )?;
        rows.first()
            .map(|r| {
                Ok(Lease {
                    holder: r.get(0),
                    term: uint(r.get(1), &format!("leases/{name}"))?,
                })
            })
            .transpose()
    }

    fn prune_leases(&self, prefix: &str, ended_for: Duration) -> Result<u64, StoreError> {
        // `left(...) = $1`, not LIKE: a name may hold `%` or `_`.
        self.execute(
            "DELETE FROM leases
             WHERE left(name, char_length($1)) = $1
               AND expires_at <= now() - $2::bigint * interval '1 millisecond'",
            params![prefix.to_owned(), ttl_ms(ended_for)],
        )
    }

    fn audit_put_head_fenced(&self, fence: &Fence, head: &SignedHead) -> Result<bool, StoreError> {
        // The lease row is locked (FOR SHARE) by the check, so a takeover
        // waits for this write to commit, or this write sees it and is
        // refused.
        let n = self.execute(
            "INSERT INTO audit_heads (seq, record)
             SELECT $1::bigint, $2::jsonb FROM leases
             WHERE name = $3 AND holder = $4 AND term = $5 AND expires_at > now()
             FOR SHARE
             ON CONFLICT (seq) DO UPDATE SET record = EXCLUDED.record",
            params![
                int(head.seq, "audit head seq")?,
                Json(head.clone()),
                fence.lease.clone(),
                fence.holder.clone(),
                int(fence.term, "lease term")?
            ],
        )?;
        Ok(n == 1)
    }

    fn put_export_cursor_fenced(
        &self,
        fence: &Fence,
        name: &str,
        cursor: ExportCursor,
    ) -> Result<bool, StoreError> {
        // Fenced as the audit head is: the lease row is locked by the check.
        let n = self.execute(
            "INSERT INTO export_cursors (name, records, heads)
             SELECT $1::text, $2::bigint, $3::bigint FROM leases
             WHERE leases.name = $4 AND holder = $5 AND term = $6 AND expires_at > now()
             FOR SHARE
             ON CONFLICT (name) DO UPDATE SET records = EXCLUDED.records, heads = EXCLUDED.heads",
            params![
                name.to_owned(),
                int(cursor.records, "export cursor")?,
                int(cursor.heads, "export cursor")?,
                fence.lease.clone(),
                fence.holder.clone(),
                int(fence.term, "lease term")?
            ],
        )?;
        Ok(n == 1)
    }

    fn export_cursor(&self, name: &str) -> Result<Option<ExportCursor>, StoreError> {
        let rows = self.query(
            "SELECT records, heads FROM export_cursors WHERE name = $1",
            params![name.to_owned()],
        )?;
        let Some(r) = rows.first() else {
            return Ok(None);
        };
        Ok(Some(ExportCursor {
            records: uint(r.get(0), "export cursor")?,
            heads: uint(r.get(1), "export cursor")?,
        }))
    }
}
