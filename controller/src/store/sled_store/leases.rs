//! Leases on sled: the grants of this open ([`LocalLeases`]), and each
//! lease's last term in `meta` record `lease/NAME`.

use std::time::Duration;

use fleetcmd_core::audit::SignedHead;

use super::super::layout::{cursor_value, decode_cursor, encode_head, seq_key};
use super::super::local_leases::{decode_term, encode_term, name_of_term_key, term_key};
use super::super::{ExportCursor, Fence, Lease, LeaseStore, StoreError};
use super::SledStore;

impl SledStore {
    /// The last term granted for `name`, by any open.
    fn stored_term(&self, name: &str) -> Result<u64, StoreError> {
        match self
            .trees()?
            .meta
            .get(term_key(name))
            .map_err(|e| self.fail(e))?
        {
            Some(v) => decode_term(name, &v),
            None => Ok(0),
        }
    }
}

impl LeaseStore for SledStore {
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
            || self.stored_term(name),
            |term| self.insert(&self.trees()?.meta, &term_key(name), encode_term(term)),
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
        let meta = self.trees()?.meta.clone();
        let mut names = Vec::new();
        for kv in meta.scan_prefix(term_key(prefix)) {
            let (k, _) = kv.map_err(|e| self.fail(e))?;
            names.extend(name_of_term_key(&k));
        }
        self.leases.prune(names, ended_for, |name| {
            meta.remove(term_key(name))
                .map(drop)
                .map_err(|e| self.fail(e))
        })
    }

    fn audit_put_head_fenced(&self, fence: &Fence, head: &SignedHead) -> Result<bool, StoreError> {
        self.leases.fenced(fence, || {
            self.insert(
                &self.trees()?.audit_heads,
                &seq_key(head.seq),
                encode_head(head),
            )
        })
    }

    fn put_export_cursor_fenced(
        &self,
        fence: &Fence,
        name: &str,
        cursor: ExportCursor,
    ) -> Result<bool, StoreError> {
        self.leases.fenced(fence, || {
            self.insert(
                &self.trees()?.export_cursors,
                name.as_bytes(),
                cursor_value(cursor),
            )
        })
    }

    fn export_cursor(&self, name: &str) -> Result<Option<ExportCursor>, StoreError> {
        self.trees()?
            .export_cursors
            .get(name.as_bytes())
            .map_err(|e| self.fail(e))?
            .map(|v| decode_cursor(name, &v))
            .transpose()
    }
}
