//! The second embedded backend: one redb file (`db.redb` in the data dir),
//! one table per kind of record, keys and values as `layout` lays them out
//! (the same bytes as the sled store's trees).
//!
//! Every write is one redb write transaction, committed without an fsync
//! (`Durability::None`): visible to every later read at once, durable at
//! the next `flush`, which commits with `Durability::Immediate` (redb makes
//! every earlier commit durable with it). Write transactions take turns
//! (redb has one writer at a time), so each check and its write — a
//! compare-and-set of a target, a token use, the audit chain's next
//! sequence number — is one step without retry loops; reads are snapshots
//! that never wait for the writer.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fleetcmd_core::audit::{Record, SignedHead};
use fleetcmd_core::state::TargetState;
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};
use serde::de::DeserializeOwned;

use super::layout::{
    decode_head, decode_record, encode_head, history_key, history_prefix, index_key, index_range,
    prefix_end, seq_key, seq_of, short_of, state_key, target_key, targets_prefix, time_of,
    use_token,
};
use super::local_leases::LocalLeases;
use super::records::{decode, decode_target, encode, encode_target};
use super::reopening::Reopening;
use super::{
    AgentRecord, AgentStore, AuditDim, AuditIndexEntry, AuditStore, HealthRecord, HealthStore,
    HealthTransition, JobClash, JobQuery, JobRecord, JobStore, Order, PolicyRecord, PolicyStore,
    RevocationStore, Store, StoreError, TargetRecord, TargetWrite, TokenRecord, TokenRefusal,
    TokenStore, check_distinct,
};
use crate::revocation::CertRevocation;

mod claims;
mod leases;
mod presence;

/// The file the redb store keeps in the data dir.
pub const REDB_FILE: &str = "db.redb";

type Bytes = TableDefinition<'static, &'static [u8], &'static [u8]>;

const TOKENS: Bytes = TableDefinition::new("tokens");
const AGENTS: Bytes = TableDefinition::new("agents");
const JOBS: Bytes = TableDefinition::new("jobs");
const JOB_SHORT: Bytes = TableDefinition::new("job_short");
const TARGETS: Bytes = TableDefinition::new("targets");
const META: Bytes = TableDefinition::new("meta");
const AUDIT: Bytes = TableDefinition::new("audit");
const AUDIT_INDEX: Bytes = TableDefinition::new("audit_index");
const AUDIT_HEADS: Bytes = TableDefinition::new("audit_heads");
const HEALTH: Bytes = TableDefinition::new("health");
const REVOKED_CERTS: Bytes = TableDefinition::new("revoked_certs");
const CLAIMS: Bytes = TableDefinition::new("claims");
const PRESENCE: Bytes = TableDefinition::new("presence");
const AGENT_LIVE: Bytes = TableDefinition::new("agent_live");
const EXPORT_CURSORS: Bytes = TableDefinition::new("export_cursors");

const TABLES: [Bytes; 15] = [
    TOKENS,
    AGENTS,
    JOBS,
    JOB_SHORT,
    TARGETS,
    META,
    AUDIT,
    AUDIT_INDEX,
    AUDIT_HEADS,
    HEALTH,
    REVOKED_CERTS,
    CLAIMS,
    PRESENCE,
    AGENT_LIVE,
    EXPORT_CURSORS,
];

/// Why a step inside a transaction failed: redb's error (mapped by
/// `RedbStore::fail`, which reopens after an I/O error) or the store's own.
#[derive(Debug)]
pub(crate) enum Fail {
    Db(redb::Error),
    Store(StoreError),
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Store(e)
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for Fail {
            fn from(e: $t) -> Self {
                Fail::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// The redb backend.
///
/// After an I/O error (a full disk, say) redb refuses every later write
/// with `PreviousIo`; as the sled store does, this store then reopens the
/// file on the next call, so the controller recovers once space returns.
/// Commits that were not flushed before the error were never acknowledged
/// and are gone.
pub struct RedbStore {
    path: PathBuf,
    cache_bytes: u64,
    db: Reopening<Database>,
    /// The grants of this open (one process holds the file).
    leases: LocalLeases,
    /// Write transactions committed by this open, and how many of them the
    /// last durable commit covered: a flush that finds its writes already
    /// covered by another flush returns at once (one fsync for many
    /// callers).
    written: AtomicU64,
    durable: Mutex<u64>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn open_db(path: &Path, cache_bytes: u64) -> Result<Database, StoreError> {
    let open_err = |e: &dyn std::fmt::Display| StoreError::Open {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let db = redb::Builder::new()
        .set_cache_size(usize::try_from(cache_bytes).unwrap_or(usize::MAX))
        .create(path)
        .map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                open_err(&"held open by another process (could not acquire lock)")
            }
            e => open_err(&e),
        })?;
    // Every table exists from the first open on, so reads never meet a
    // missing one.
    let init = || -> Result<(), Fail> {
        let tx = db.begin_write()?;
        for t in TABLES {
            tx.open_table(t)?;
        }
        tx.commit()?;
        Ok(())
    };
    init().map_err(|e| match e {
        Fail::Db(e) => open_err(&e),
        Fail::Store(e) => e,
    })?;
    Ok(db)
}

/// Reads a record table's value.
fn get_in<T: DeserializeOwned>(
    t: &impl ReadableTable<&'static [u8], &'static [u8]>,
    key: &[u8],
) -> Result<Option<T>, Fail> {
    Ok(t.get(key)?.map(|v| decode(key, v.value())).transpose()?)
}

/// The bytes of a value, if any.
fn bytes_in(
    t: &impl ReadableTable<&'static [u8], &'static [u8]>,
    key: &[u8],
) -> Result<Option<Vec<u8>>, Fail> {
    Ok(t.get(key)?.map(|v| v.value().to_vec()))
}

/// A key and its value, read out of a transaction.
type KeyValue = (Vec<u8>, Vec<u8>);

/// The keys and values starting with `prefix`, in key order.
fn prefixed(
    t: &impl ReadableTable<&'static [u8], &'static [u8]>,
    prefix: &[u8],
) -> Result<Vec<KeyValue>, Fail> {
    let range = match prefix_end(prefix) {
        Some(end) => t.range(prefix..end.as_slice())?,
        None => t.range(prefix..)?,
    };
    let mut out = Vec::new();
    for kv in range {
        let (k, v) = kv?;
        out.push((k.value().to_vec(), v.value().to_vec()));
    }
    Ok(out)
}

fn target_state(key: &[u8], old: Option<&[u8]>) -> Result<TargetState, StoreError> {
    Ok(match old {
        Some(v) => decode_target(key, v)?.state,
        None => TargetState::Pending,
    })
}

impl RedbStore {
    /// Opens `path` (a file: created if missing) with a page cache of at
    /// most `cache_bytes`.
    pub fn open_with_cache(path: &Path, cache_bytes: u64) -> Result<RedbStore, StoreError> {
        let db = open_db(path, cache_bytes)?;
        Ok(RedbStore {
            path: path.to_owned(),
            cache_bytes,
            db: Reopening::new(db),
            leases: LocalLeases::default(),
            written: AtomicU64::new(0),
            durable: Mutex::new(0),
        })
    }

    /// Opens with the default page cache (`DEFAULT_CACHE_BYTES`).
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        Self::open_with_cache(path, super::DEFAULT_CACHE_BYTES)
    }

    /// The open database, reopening it if an I/O error poisoned the last one.
    fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.db
            .get(&self.path, || open_db(&self.path, self.cache_bytes))
    }

    /// Maps a failure; an I/O error drops the handle so the next call
    /// reopens the file.
    fn fail(&self, e: Fail) -> StoreError {
        match e {
            Fail::Store(e) => e,
            Fail::Db(e) => {
                if matches!(
                    e,
                    redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed
                ) {
                    self.db.drop_handle();
                }
                StoreError::Backend(e.to_string())
            }
        }
    }

    /// Runs `f` in one write transaction and commits it (without an fsync:
    /// `flush` makes it durable); an error aborts it, nothing written.
    fn write<T>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<T, Fail>,
    ) -> Result<T, StoreError> {
        let db = self.db()?;
        let run = || -> Result<T, Fail> {
            let mut tx = db.begin_write()?;
            tx.set_durability(Durability::None)?;
            match f(&tx) {
                Ok(v) => {
                    tx.commit()?;
                    self.written.fetch_add(1, Ordering::AcqRel);
                    Ok(v)
                }
                Err(e) => {
                    tx.abort()?;
                    Err(e)
                }
            }
        };
        run().map_err(|e| self.fail(e))
    }

    /// Runs `f` on a snapshot of the last commit.
    fn read<T>(
        &self,
        f: impl FnOnce(&ReadTransaction) -> Result<T, Fail>,
    ) -> Result<T, StoreError> {
        let db = self.db()?;
        let run = || -> Result<T, Fail> { f(&db.begin_read()?) };
        run().map_err(|e| self.fail(e))
    }

    /// Puts one value.
    fn put(&self, table: Bytes, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.open_table(table)?.insert(key, value)?;
            Ok(())
        })
    }

    /// Reads one record.
    fn get<T: DeserializeOwned>(&self, table: Bytes, key: &[u8]) -> Result<Option<T>, StoreError> {
        self.read(|tx| get_in(&tx.open_table(table)?, key))
    }

    /// Every record of a table, in key order.
    fn all<T: DeserializeOwned>(&self, table: Bytes) -> Result<Vec<T>, StoreError> {
        self.read(|tx| {
            let t = tx.open_table(table)?;
            let mut out = Vec::new();
            for kv in t.iter()? {
                let (k, v) = kv?;
                out.push(decode(k.value(), v.value())?);
            }
            Ok(out)
        })
    }

    /// The size of the database file in bytes (the bench's size report).
    pub fn file_bytes(&self) -> Result<u64, StoreError> {
        std::fs::metadata(&self.path)
            .map(|m| m.len())
            .map_err(|e| StoreError::Backend(format!("{}: {e}", self.path.display())))
    }
}

impl Store for RedbStore {
    fn flush(&self) -> Result<(), StoreError> {
        let want = self.written.load(Ordering::Acquire);
        let mut durable = self.durable.lock().unwrap_or_else(|p| p.into_inner());
        if *durable >= want {
            return Ok(());
        }
        let db = self.db()?;
        let covers = self.written.load(Ordering::Acquire);
        let run = || -> Result<(), Fail> {
            let mut tx = db.begin_write()?;
            tx.set_durability(Durability::Immediate)?;
            tx.commit()?;
            Ok(())
        };
        run().map_err(|e| self.fail(e))?;
        // The commits counted before this one began are durable now.
        *durable = covers;
        Ok(())
    }

    /// One write transaction: the checks, the targets, the records and
    /// their index entries, all or nothing.
    fn put_targets_audited(
        &self,
        from: TargetState,
        writes: &[TargetWrite<'_>],
        audit: &[(Record, Vec<AuditIndexEntry>)],
    ) -> Result<Result<(), Vec<usize>>, StoreError> {
        check_distinct(writes)?;
        self.write(|tx| {
            let mut log = tx.open_table(AUDIT)?;
            if let Some((first, _)) = audit.first() {
                check_next(&log, first.seq)?;
            }
            let mut targets = tx.open_table(TARGETS)?;
            let keys: Vec<Vec<u8>> = writes.iter().map(|w| target_key(w.job, w.agent)).collect();
            let mut lost = Vec::new();
            for (i, key) in keys.iter().enumerate() {
                let old = bytes_in(&targets, key)?;
                if target_state(key, old.as_deref())? != from {
                    lost.push(i);
                }
            }
            if !lost.is_empty() {
                return Ok(Err(lost));
            }
            for (key, w) in keys.iter().zip(writes) {
                targets.insert(key.as_slice(), encode_target(w.rec).as_slice())?;
            }
            let mut index = tx.open_table(AUDIT_INDEX)?;
            let mut next = audit.first().map(|(r, _)| r.seq);
            for (rec, entries) in audit {
                if Some(rec.seq) != next {
                    return Err(StoreError::Conflict {
                        what: format!("audit record {}", rec.seq),
                        reason: "the records of one step are not contiguous".into(),
                    }
                    .into());
                }
                next = rec.seq.checked_add(1);
                log.insert(
                    seq_key(rec.seq).as_slice(),
                    crate::audit::codec::encode(rec).as_slice(),
                )?;
                for e in entries {
                    index.insert(index_key(e).as_slice(), &[][..])?;
                }
            }
            Ok(Ok(()))
        })
    }

    /// A write transaction per call: one per batch of results beats two
    /// per result (the target, then its audit record).
    fn batches_results(&self) -> bool {
        true
    }

    fn close(&self) {
        self.db.close();
    }
}

/// Refuses `seq` unless it continues the log (any seq on an empty log).
fn check_next(
    log: &impl ReadableTable<&'static [u8], &'static [u8]>,
    seq: u64,
) -> Result<(), Fail> {
    if let Some((k, _)) = log.last()? {
        let last = seq_of(k.value());
        if last.checked_add(1) != Some(seq) {
            return Err(StoreError::Conflict {
                what: format!("audit record {seq}"),
                reason: format!("the newest record is {last}"),
            }
            .into());
        }
    }
    Ok(())
}

impl TokenStore for RedbStore {
    fn put_token(&self, id: &str, rec: &TokenRecord) -> Result<(), StoreError> {
        self.put(TOKENS, id.as_bytes(), &encode(rec))
    }

    fn consume_token(
        &self,
        id: &str,
        secret_hash: &str,
        now: u64,
    ) -> Result<Result<TokenRecord, TokenRefusal>, StoreError> {
        self.write(|tx| {
            let mut t = tx.open_table(TOKENS)?;
            let Some(rec) = get_in::<TokenRecord>(&t, id.as_bytes())? else {
                return Ok(Err(TokenRefusal::Unknown));
            };
            let next = match use_token(&rec, secret_hash, now) {
                Ok(next) => next,
                Err(refusal) => return Ok(Err(refusal)),
            };
            t.insert(id.as_bytes(), encode(&next).as_slice())?;
            Ok(Ok(rec))
        })
    }
}

impl AgentStore for RedbStore {
    fn put_agent(&self, rec: &AgentRecord) -> Result<(), StoreError> {
        self.put(AGENTS, rec.id.as_bytes(), &encode(rec))
    }

    fn get_agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
        self.get(AGENTS, id.as_bytes())
    }

    fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.all(AGENTS)
    }

    fn get_agents(&self, ids: &[&str]) -> Result<Vec<AgentRecord>, StoreError> {
        self.read(|tx| {
            let t = tx.open_table(AGENTS)?;
            let mut out = Vec::new();
            for id in ids {
                out.extend(get_in(&t, id.as_bytes())?);
            }
            Ok(out)
        })
    }
}

impl PolicyStore for RedbStore {
    fn put_policy(&self, rec: &PolicyRecord) -> Result<bool, StoreError> {
        self.write(|tx| {
            let mut meta = tx.open_table(META)?;
            if let Some(stored) = get_in::<PolicyRecord>(&meta, b"policy")?
                && stored.version >= rec.version
            {
                return Ok(false);
            }
            meta.insert(&b"policy"[..], encode(rec).as_slice())?;
            Ok(true)
        })
    }

    fn get_policy(&self) -> Result<Option<PolicyRecord>, StoreError> {
        self.get(META, b"policy")
    }
}

impl JobStore for RedbStore {
    fn create_job(
        &self,
        short: &str,
        rec: &JobRecord,
        targets: &[(&str, &TargetRecord)],
    ) -> Result<Result<(), JobClash>, StoreError> {
        let id = rec.id.as_bytes();
        self.write(|tx| {
            let mut jobs = tx.open_table(JOBS)?;
            if jobs.get(id)?.is_some() {
                return Ok(Err(JobClash::IdExists));
            }
            let mut shorts = tx.open_table(JOB_SHORT)?;
            if let Some(holder) = bytes_in(&shorts, short.as_bytes())?
                && holder != id
            {
                return Ok(Err(JobClash::ShortIdTaken {
                    holder: String::from_utf8_lossy(&holder).into_owned(),
                }));
            }
            shorts.insert(short.as_bytes(), id)?;
            jobs.insert(id, encode(rec).as_slice())?;
            let mut tgts = tx.open_table(TARGETS)?;
            for (agent, r) in targets {
                tgts.insert(
                    target_key(&rec.id, agent).as_slice(),
                    encode_target(r).as_slice(),
                )?;
            }
            Ok(Ok(()))
        })
    }

    fn put_job(&self, rec: &JobRecord) -> Result<(), StoreError> {
        self.put(JOBS, rec.id.as_bytes(), &encode(rec))
    }

    fn get_job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        self.get(JOBS, id.as_bytes())
    }

    fn job_id_by_short(&self, short: &str) -> Result<Option<String>, StoreError> {
        self.read(|tx| {
            Ok(bytes_in(&tx.open_table(JOB_SHORT)?, short.as_bytes())?
                .map(|v| String::from_utf8_lossy(&v).into_owned()))
        })
    }

    fn job_ids_with_prefix(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        self.read(|tx| {
            let t = tx.open_table(JOBS)?;
            let mut out = Vec::new();
            for kv in t.range(prefix.as_bytes()..)? {
                let (k, _) = kv?;
                if out.len() >= limit || !k.value().starts_with(prefix.as_bytes()) {
                    break;
                }
                out.push(String::from_utf8_lossy(k.value()).into_owned());
            }
            Ok(out)
        })
    }

    fn list_jobs(&self, q: &JobQuery) -> Result<Vec<JobRecord>, StoreError> {
        use std::ops::Bound::{Excluded, Unbounded};
        self.read(|tx| {
            let t = tx.open_table(JOBS)?;
            let after = q.after.as_deref().map(str::as_bytes);
            let range = match after {
                None => t.range(..)?,
                Some(a) => match q.order {
                    Order::NewestFirst => t.range(..a)?,
                    Order::OldestFirst => t.range((Excluded(a), Unbounded))?,
                },
            };
            let iter: Box<dyn Iterator<Item = _>> = match q.order {
                Order::NewestFirst => Box::new(range.rev()),
                Order::OldestFirst => Box::new(range),
            };
            Ok(q.take_from(iter.map(|kv| {
                let (k, v) = kv.map_err(|e| self.fail(Fail::Db(e.into())))?;
                decode(k.value(), v.value())
            }))?)
        })
    }

    fn delete_job(&self, id: &str) -> Result<u64, StoreError> {
        let prefix = targets_prefix(id);
        self.write(|tx| {
            let mut freed = 0u64;
            let mut tgts = tx.open_table(TARGETS)?;
            for (k, v) in prefixed(&tgts, prefix.as_bytes())? {
                tgts.remove(k.as_slice())?;
                freed += (k.len() + v.len()) as u64;
            }
            let mut jobs = tx.open_table(JOBS)?;
            if let Some(v) = jobs.remove(id.as_bytes())? {
                freed += (id.len() + v.value().len()) as u64;
            }
            // Only if it names this job (an old store may have given it to
            // another one).
            if let Some(short) = short_of(id.as_bytes()) {
                let mut shorts = tx.open_table(JOB_SHORT)?;
                if bytes_in(&shorts, short.as_bytes())?.is_some_and(|h| h == id.as_bytes()) {
                    shorts.remove(short.as_bytes())?;
                }
            }
            Ok(freed)
        })
    }

    fn job_bytes(&self) -> Result<u64, StoreError> {
        self.read(|tx| {
            let mut total = 0u64;
            for table in [JOBS, TARGETS] {
                for kv in tx.open_table(table)?.iter()? {
                    let (k, v) = kv?;
                    total += (k.value().len() + v.value().len()) as u64;
                }
            }
            Ok(total)
        })
    }

    fn put_target(&self, job: &str, agent: &str, rec: &TargetRecord) -> Result<(), StoreError> {
        self.put(TARGETS, &target_key(job, agent), &encode_target(rec))
    }

    fn put_targets(&self, job: &str, recs: &[(&str, &TargetRecord)]) -> Result<(), StoreError> {
        self.write(|tx| {
            let mut t = tx.open_table(TARGETS)?;
            for (agent, rec) in recs {
                t.insert(
                    target_key(job, agent).as_slice(),
                    encode_target(rec).as_slice(),
                )?;
            }
            Ok(())
        })
    }

    fn put_targets_if(
        &self,
        job: &str,
        from: TargetState,
        recs: &[(&str, &TargetRecord)],
    ) -> Result<Vec<String>, StoreError> {
        self.write(|tx| {
            let mut t = tx.open_table(TARGETS)?;
            let mut written = Vec::new();
            for (agent, rec) in recs {
                let key = target_key(job, agent);
                let old = bytes_in(&t, &key)?;
                if target_state(&key, old.as_deref())? == from {
                    t.insert(key.as_slice(), encode_target(rec).as_slice())?;
                    written.push((*agent).to_owned());
                }
            }
            Ok(written)
        })
    }

    fn get_target(&self, job: &str, agent: &str) -> Result<Option<TargetRecord>, StoreError> {
        let key = target_key(job, agent);
        self.read(|tx| {
            Ok(bytes_in(&tx.open_table(TARGETS)?, &key)?
                .map(|v| decode_target(&key, &v))
                .transpose()?)
        })
    }

    fn targets(&self, job: &str) -> Result<Vec<(String, TargetRecord)>, StoreError> {
        let prefix = targets_prefix(job);
        self.read(|tx| {
            prefixed(&tx.open_table(TARGETS)?, prefix.as_bytes())?
                .into_iter()
                .map(|(k, v)| {
                    let agent = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                    Ok((agent, decode_target(&k, &v)?))
                })
                .collect()
        })
    }
}

impl AuditStore for RedbStore {
    fn audit_append(&self, rec: &Record, index: &[AuditIndexEntry]) -> Result<(), StoreError> {
        self.write(|tx| {
            let mut log = tx.open_table(AUDIT)?;
            check_next(&log, rec.seq)?;
            log.insert(
                seq_key(rec.seq).as_slice(),
                crate::audit::codec::encode(rec).as_slice(),
            )?;
            let mut t = tx.open_table(AUDIT_INDEX)?;
            for e in index {
                t.insert(index_key(e).as_slice(), &[][..])?;
            }
            Ok(())
        })
    }

    fn audit_put_index(&self, index: &[AuditIndexEntry]) -> Result<(), StoreError> {
        self.write(|tx| {
            let mut t = tx.open_table(AUDIT_INDEX)?;
            for e in index {
                t.insert(index_key(e).as_slice(), &[][..])?;
            }
            Ok(())
        })
    }

    fn audit_last(&self) -> Result<Option<Record>, StoreError> {
        self.read(|tx| {
            Ok(tx
                .open_table(AUDIT)?
                .last()?
                .map(|(k, v)| decode_record(k.value(), v.value()))
                .transpose()?)
        })
    }

    fn audit_first_seq(&self) -> Result<Option<u64>, StoreError> {
        self.read(|tx| {
            Ok(tx
                .open_table(AUDIT)?
                .first()?
                .map(|(k, _)| seq_of(k.value())))
        })
    }

    fn audit_get(&self, seq: u64) -> Result<Option<Record>, StoreError> {
        let k = seq_key(seq);
        self.read(|tx| {
            Ok(bytes_in(&tx.open_table(AUDIT)?, &k)?
                .map(|v| decode_record(&k, &v))
                .transpose()?)
        })
    }

    fn audit_records(
        &self,
        from: u64,
        to: u64,
        order: Order,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        if from >= to {
            return Ok(Vec::new());
        }
        self.read(|tx| {
            let t = tx.open_table(AUDIT)?;
            let (lo, hi) = (seq_key(from), seq_key(to));
            let range = t.range(lo.as_slice()..hi.as_slice())?;
            let iter: Box<dyn Iterator<Item = _>> = match order {
                Order::OldestFirst => Box::new(range),
                Order::NewestFirst => Box::new(range.rev()),
            };
            let mut out = Vec::new();
            for kv in iter.take(limit) {
                let (k, v) = kv?;
                out.push(decode_record(k.value(), v.value())?);
            }
            Ok(out)
        })
    }

    fn audit_index_page(
        &self,
        dim: AuditDim,
        value: &str,
        since_ms: u64,
        before: (u64, u64),
        limit: usize,
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        let Some((lo, hi)) = index_range(dim, value, since_ms, before) else {
            return Ok(Vec::new());
        };
        self.read(|tx| {
            let t = tx.open_table(AUDIT_INDEX)?;
            let mut out = Vec::new();
            for kv in t.range(lo.as_slice()..hi.as_slice())?.rev().take(limit) {
                let k = kv?.0;
                out.push((time_of(k.value()), seq_of(k.value())));
            }
            Ok(out)
        })
    }

    fn audit_remove_through(
        &self,
        through: u64,
        index: &[AuditIndexEntry],
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            let mut t = tx.open_table(AUDIT_INDEX)?;
            for e in index {
                t.remove(index_key(e).as_slice())?;
            }
            let mut log = tx.open_table(AUDIT)?;
            let end = seq_key(through);
            log.retain_in(..=end.as_slice(), |_, _| false)?;
            Ok(())
        })
    }

    fn audit_put_head(&self, head: &SignedHead) -> Result<(), StoreError> {
        self.put(AUDIT_HEADS, &seq_key(head.seq), &encode_head(head))
    }

    fn audit_heads_from(&self, from: u64) -> Result<Vec<SignedHead>, StoreError> {
        self.read(|tx| {
            let t = tx.open_table(AUDIT_HEADS)?;
            let lo = seq_key(from);
            let mut out = Vec::new();
            for kv in t.range(lo.as_slice()..)? {
                let (k, v) = kv?;
                out.push(decode_head(k.value(), v.value())?);
            }
            Ok(out)
        })
    }

    fn audit_last_head_seq(&self) -> Result<Option<u64>, StoreError> {
        self.read(|tx| {
            Ok(tx
                .open_table(AUDIT_HEADS)?
                .last()?
                .map(|(k, _)| seq_of(k.value())))
        })
    }

    fn audit_remove_heads_before(&self, before: u64) -> Result<(), StoreError> {
        self.write(|tx| {
            let end = seq_key(before);
            tx.open_table(AUDIT_HEADS)?
                .retain_in(..end.as_slice(), |_, _| false)?;
            Ok(())
        })
    }
}

impl HealthStore for RedbStore {
    fn health_state(&self, name: &str) -> Result<Option<HealthRecord>, StoreError> {
        self.get(HEALTH, &state_key(name))
    }

    fn put_health_state(&self, name: &str, rec: &HealthRecord) -> Result<(), StoreError> {
        self.put(HEALTH, &state_key(name), &encode(rec))
    }

    fn add_health_transition(
        &self,
        name: &str,
        tr: &HealthTransition,
        keep: usize,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            let mut t = tx.open_table(HEALTH)?;
            t.insert(
                history_key(name, tr.at_ms).as_slice(),
                encode(tr).as_slice(),
            )?;
            let prefix = history_prefix(name);
            let keys: Vec<Vec<u8>> = prefixed(&t, &prefix)?.into_iter().map(|(k, _)| k).collect();
            if keys.len() > keep {
                for k in &keys[..keys.len() - keep] {
                    t.remove(k.as_slice())?;
                }
            }
            Ok(())
        })
    }

    fn health_transitions(
        &self,
        name: &str,
        limit: usize,
    ) -> Result<Vec<HealthTransition>, StoreError> {
        self.read(|tx| {
            prefixed(&tx.open_table(HEALTH)?, &history_prefix(name))?
                .iter()
                .rev()
                .take(limit)
                .map(|(k, v)| Ok(decode(k, v)?))
                .collect()
        })
    }
}

impl RevocationStore for RedbStore {
    fn put_revocation(&self, rec: &CertRevocation) -> Result<(), StoreError> {
        self.put(REVOKED_CERTS, rec.key().as_bytes(), &encode(rec))
    }

    fn revocations(&self) -> Result<Vec<CertRevocation>, StoreError> {
        self.all(REVOKED_CERTS)
    }
}

#[cfg(test)]
mod tests;
