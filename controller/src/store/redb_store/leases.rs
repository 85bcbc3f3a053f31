//! Leases on redb: the grants of this open ([`LocalLeases`]), and each
//! lease's last term in `meta` record `lease/NAME`; a fenced write checks
//! its grant and commits while holding the grants.
//!
//! [`LocalLeases`]: super::super::local_leases::LocalLeases

use std::time::Duration;

use fleetcmd_core::audit::SignedHead;
use redb::ReadableTable;

use super::super::layout::{cursor_value, decode_cursor, encode_head, prefix_end, seq_key};
use super::super::local_leases::{decode_term, encode_term, name_of_term_key, term_key};
use super::super::{ExportCursor, Fence, Lease, LeaseStore, StoreError};
use super::{AUDIT_HEADS, EXPORT_CURSORS, META, RedbStore, bytes_in};

impl LeaseStore for RedbStore {
    fn lease_acquire(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        self.leases.acquire(
            name,
            holder,
            ttl,
            || {
                self.read(|tx| bytes_in(&tx.open_table(META)?, &term_key(name)))?
                    .map_or(Ok(0), |v| decode_term(name, &v))
            },
            |term| self.put(META, &term_key(name), &encode_term(term)),
        )
    }

    fn lease_renew(
        &self,
        name: &str,
        holder: &str,
        term: u64,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        Ok(self.leases.extend(name, holder, term, Some(ttl)))
    }

    fn lease_release(&self, name: &str, holder: &str, term: u64) -> Result<bool, StoreError> {
        Ok(self.leases.extend(name, holder, term, None))
    }

    fn lease_holder(&self, name: &str) -> Result<Option<Lease>, StoreError> {
        Ok(self.leases.holder(name))
    }

    fn prune_leases(&self, prefix: &str, ended_for: Duration) -> Result<u64, StoreError> {
        let start = term_key(prefix);
        let names: Vec<String> = self.read(|tx| {
            let t = tx.open_table(META)?;
            let mut names = Vec::new();
            let range = match prefix_end(&start) {
                Some(end) => t.range(start.as_slice()..end.as_slice())?,
                None => t.range(start.as_slice()..)?,
            };
            for kv in range {
                names.extend(name_of_term_key(kv?.0.value()));
            }
            Ok(names)
        })?;
        self.leases.prune(names, ended_for, |name| {
            self.write(|tx| {
                tx.open_table(META)?.remove(term_key(name).as_slice())?;
                Ok(())
            })
        })
    }

    fn audit_put_head_fenced(&self, fence: &Fence, head: &SignedHead) -> Result<bool, StoreError> {
        self.leases.fenced(fence, || {
            self.put(AUDIT_HEADS, &seq_key(head.seq), &encode_head(head))
        })
    }

    fn put_export_cursor_fenced(
        &self,
        fence: &Fence,
        name: &str,
        cursor: ExportCursor,
    ) -> Result<bool, StoreError> {
        self.leases.fenced(fence, || {
            self.put(EXPORT_CURSORS, name.as_bytes(), &cursor_value(cursor))
        })
    }

    fn export_cursor(&self, name: &str) -> Result<Option<ExportCursor>, StoreError> {
        self.read(|tx| bytes_in(&tx.open_table(EXPORT_CURSORS)?, name.as_bytes()))?
            .map(|v| decode_cursor(name, &v))
            .transpose()
    }
}
