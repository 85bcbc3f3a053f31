//! The embedded backend: one sled database, one tree per kind of record,
//! keys and values as `layout` lays them out; `job_short` maps each job's
//! short id to its full id.

use std::path::Path;

use fleetcmd_core::audit::{Record, SignedHead};
use serde::de::DeserializeOwned;

use super::layout::{
    decode_head, decode_record, encode_head, history_key, history_prefix, index_key, index_range,
    seq_key, seq_of, short_of, state_key, target_key, targets_prefix, time_of, use_token,
};
use super::local_leases::LocalLeases;
use super::records::{decode, decode_target, encode, encode_target};
use super::reopening::Reopening;
use super::{
    AgentRecord, AgentStore, AuditDim, AuditIndexEntry, AuditStore, HealthRecord, HealthStore,
    HealthTransition, JobClash, JobQuery, JobRecord, JobStore, Order, PolicyRecord, PolicyStore,
    RevocationStore, Store, StoreError, TargetRecord, TokenRecord, TokenRefusal, TokenStore,
};
use crate::revocation::CertRevocation;

mod claims;
mod leases;
mod presence;

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

/// The sled backend.
///
/// sled poisons a database handle after its first I/O error (a full disk,
/// say): every later operation returns that error. The store therefore
/// reopens the database on the next call after an I/O error, so the
/// controller recovers by itself once space returns; writes that were not
/// flushed before the error were never acknowledged and are gone.
pub struct SledStore {
    path: std::path::PathBuf,
    cache_bytes: u64,
    inner: Reopening<SledTrees>,
    /// The grants of this open (one process holds the database).
    leases: LocalLeases,
}

struct SledTrees {
    db: sled::Db,
    tokens: sled::Tree,
    agents: sled::Tree,
    jobs: sled::Tree,
    job_short: sled::Tree,
    targets: sled::Tree,
    meta: sled::Tree,
    audit: sled::Tree,
    audit_index: sled::Tree,
    audit_heads: sled::Tree,
    health: sled::Tree,
    revoked_certs: sled::Tree,
    claims: sled::Tree,
    presence: sled::Tree,
    agent_live: sled::Tree,
    export_cursors: sled::Tree,
    /// The newest audit record of this open, so that an append checks its
    /// sequence number without reading the tree's last key each time (that
    /// read was 3 % of the controller's samples during durable ingest).
    /// Appends take turns under it. A reopen (after an I/O error) starts
    /// again from `Unread`: records that were lost with the old handle are
    /// not counted.
    audit_tip: std::sync::Mutex<AuditTip>,
}

/// What `SledTrees::audit_tip` knows of the newest audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuditTip {
    /// Not read since the database was opened (or records were removed).
    Unread,
    /// The log is empty: any sequence number continues it (retention may
    /// have removed every record).
    Empty,
    /// The seq of the newest record.
    At(u64),
}

/// `meta` key set once `job_short` holds every stored job's short id.
const SHORT_INDEX_BUILT: &[u8] = b"job_short_index_v1";

/// Indexes the jobs of a store written before `job_short` existed, once.
/// Two old jobs could share a short id (nothing refused it then): the
/// older keeps it, and the newer is still found by its full id or a prefix.
fn build_short_index(trees: &SledTrees) -> Result<(), sled::Error> {
    if trees.meta.contains_key(SHORT_INDEX_BUILT)? {
        return Ok(());
    }
    let mut shared = 0usize;
    for key in trees.jobs.iter().keys() {
        let key = key?;
        if let Some(short) = short_of(&key)
            && trees
                .job_short
                .compare_and_swap(short.as_bytes(), None as Option<&[u8]>, Some(&key))?
                .is_err()
        {
            shared += 1;
        }
    }
    if shared > 0 {
        tracing::warn!(
            jobs = shared,
            "stored jobs share a short id with an older job; name them by full id"
        );
    }
    trees.meta.insert(SHORT_INDEX_BUILT, &[1u8][..])?;
    trees.db.flush()?;
    Ok(())
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// sled's page cache unless configured (`store_cache_bytes`): sled's own
/// default is 1 GiB, which a controller with a few hundred thousand results
/// fills, and the OS page cache holds the same pages again anyway.
pub const DEFAULT_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// The directory the sled store keeps in the data dir.
pub const SLED_DIR: &str = "db";

/// How long `open` waits for the database's file lock.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn open_trees(path: &Path, cache_bytes: u64) -> Result<SledTrees, StoreError> {
    let open_err = |e: &dyn std::fmt::Display| StoreError::Open {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    // sled panics on some corruptions instead of returning an error; turn
    // that into the same clear message.
    let open = || {
        std::panic::catch_unwind(|| {
            sled::Config::new()
                .path(path)
                .cache_capacity(cache_bytes)
                .open()
        })
        .map_err(|_| open_err(&"the database files are corrupt"))
    };
    // A handle of this process that was just dropped (a reopen after an
    // I/O error, a restart within one process) can hold the database's
    // file lock for a moment longer, while sled's threads let go of it;
    // another process holding it is still refused, after LOCK_WAIT.
    let started = std::time::Instant::now();
    let db = loop {
        match open()? {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && started.elapsed() < LOCK_WAIT =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => break other.map_err(|e| open_err(&e))?,
        }
    };
    let tree = |name: &str| db.open_tree(name).map_err(|e| open_err(&e));
    let trees = SledTrees {
        tokens: tree("tokens")?,
        agents: tree("agents")?,
        jobs: tree("jobs")?,
        job_short: tree("job_short")?,
        targets: tree("targets")?,
        meta: tree("meta")?,
        audit: tree("audit")?,
        audit_index: tree("audit_index")?,
        audit_heads: tree("audit_heads")?,
        health: tree("health")?,
        revoked_certs: tree("revoked_certs")?,
        claims: tree("claims")?,
        presence: tree("presence")?,
        agent_live: tree("agent_live")?,
        export_cursors: tree("export_cursors")?,
        audit_tip: std::sync::Mutex::new(AuditTip::Unread),
        db,
    };
    build_short_index(&trees).map_err(|e| open_err(&e))?;
    Ok(trees)
}

impl SledStore {
    /// Opens with the default page cache (`DEFAULT_CACHE_BYTES`).
    pub fn open(path: &Path) -> Result<SledStore, StoreError> {
        Self::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// Opens with a page cache of at most `cache_bytes`.
    pub fn open_with_cache(path: &Path, cache_bytes: u64) -> Result<SledStore, StoreError> {
        let trees = open_trees(path, cache_bytes)?;
        Ok(SledStore {
            path: path.to_owned(),
            cache_bytes,
            inner: Reopening::new(trees),
            leases: LocalLeases::default(),
        })
    }

    /// The open database, reopening it if an I/O error poisoned the last one.
    fn trees(&self) -> Result<std::sync::Arc<SledTrees>, StoreError> {
        self.inner
            .get(&self.path, || open_trees(&self.path, self.cache_bytes))
    }

    /// Maps a sled error; an I/O error drops the poisoned handle so the next
    /// call reopens the database.
    fn fail(&self, e: sled::Error) -> StoreError {
        if matches!(e, sled::Error::Io(_)) {
            self.inner.drop_handle();
        }
        StoreError::Backend(e.to_string())
    }

    /// A tree of the database by name, for tools that inspect the files
    /// (the bench's size report) and tests that tamper with them; the
    /// controller itself only uses the `Store` parts. Fetch it per use:
    /// the handle changes after a reopen.
    pub fn raw_tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        let t = self.trees()?;
        t.db.open_tree(name).map_err(|e| self.fail(e))
    }

    fn get<T: DeserializeOwned>(
        &self,
        tree: &sled::Tree,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        tree.get(key.as_bytes())
            .map_err(|e| self.fail(e))?
            .map(|v| decode(key.as_bytes(), &v))
            .transpose()
    }

    fn insert(&self, tree: &sled::Tree, key: &[u8], value: Vec<u8>) -> Result<(), StoreError> {
        tree.insert(key, value).map_err(|e| self.fail(e))?;
        Ok(())
    }

    fn scan<T: DeserializeOwned>(
        &self,
        iter: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
    ) -> Result<Vec<T>, StoreError> {
        iter.map(|kv| {
            let (k, v) = kv.map_err(|e| self.fail(e))?;
            decode(&k, &v)
        })
        .collect()
    }
}

/// Maps a transaction's outcome: an abort is the caller's answer, a
/// storage error the store's.
fn tx_outcome<T, E>(
    store: &SledStore,
    r: sled::transaction::TransactionResult<T, E>,
) -> Result<Result<T, E>, StoreError> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(sled::transaction::TransactionError::Abort(e)) => Ok(Err(e)),
        Err(sled::transaction::TransactionError::Storage(e)) => Err(store.fail(e)),
    }
}

type KvIter = Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>>;

impl Store for SledStore {
    fn flush(&self) -> Result<(), StoreError> {
        self.trees()?.db.flush().map_err(|e| self.fail(e))?;
        Ok(())
    }

    fn close(&self) {
        self.inner.close();
    }
}

impl TokenStore for SledStore {
    fn put_token(&self, id: &str, rec: &TokenRecord) -> Result<(), StoreError> {
        self.insert(&self.trees()?.tokens, id.as_bytes(), encode(rec))
    }

    fn consume_token(
        &self,
        id: &str,
        secret_hash: &str,
        now: u64,
    ) -> Result<Result<TokenRecord, TokenRefusal>, StoreError> {
        let t = self.trees()?;
        loop {
            let Some(old) = t.tokens.get(id.as_bytes()).map_err(|e| self.fail(e))? else {
                return Ok(Err(TokenRefusal::Unknown));
            };
            let rec: TokenRecord = decode(id.as_bytes(), &old)?;
            let next = match use_token(&rec, secret_hash, now) {
                Ok(next) => next,
                Err(refusal) => return Ok(Err(refusal)),
            };
            match t
                .tokens
                .compare_and_swap(id.as_bytes(), Some(old), Some(encode(&next)))
                .map_err(|e| self.fail(e))?
            {
                Ok(()) => return Ok(Ok(rec)),
                Err(_) => continue, // somebody else used it meanwhile: re-read
            }
        }
    }
}

impl AgentStore for SledStore {
    fn put_agent(&self, rec: &AgentRecord) -> Result<(), StoreError> {
        self.insert(&self.trees()?.agents, rec.id.as_bytes(), encode(rec))
    }

    fn get_agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
        self.get(&self.trees()?.agents, id)
    }

    fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.scan(self.trees()?.agents.iter())
    }
}

impl PolicyStore for SledStore {
    fn put_policy(&self, rec: &PolicyRecord) -> Result<bool, StoreError> {
        let meta = &self.trees()?.meta;
        let new = encode(rec);
        // Compare-and-swap on the bytes read: a write in between makes the
        // swap fail, and the version is compared again.
        loop {
            let old = meta.get(b"policy").map_err(|e| self.fail(e))?;
            if let Some(v) = &old {
                let stored: PolicyRecord = decode(b"policy", v)?;
                if stored.version >= rec.version {
                    return Ok(false);
                }
            }
            if meta
                .compare_and_swap(b"policy", old, Some(new.clone()))
                .map_err(|e| self.fail(e))?
                .is_ok()
            {
                return Ok(true);
            }
        }
    }

    fn get_policy(&self) -> Result<Option<PolicyRecord>, StoreError> {
        self.get(&self.trees()?.meta, "policy")
    }
}

impl JobStore for SledStore {
    fn create_job(
        &self,
        short: &str,
        rec: &JobRecord,
        targets: &[(&str, &TargetRecord)],
    ) -> Result<Result<(), JobClash>, StoreError> {
        use sled::Transactional;
        use sled::transaction::abort;
        let t = self.trees()?;
        let id = rec.id.as_bytes();
        let value = encode(rec);
        let targets: Vec<(Vec<u8>, Vec<u8>)> = targets
            .iter()
            .map(|(agent, r)| (target_key(&rec.id, agent), encode_target(r)))
            .collect();
        // A transaction only here, at creation (rare): sled's transactions
        // take its global write lock, which the per-result writes avoid.
        let r = (&t.jobs, &t.job_short, &t.targets).transaction(|(jobs, shorts, tgts)| {
            if jobs.get(id)?.is_some() {
                return abort(JobClash::IdExists);
            }
            if let Some(holder) = shorts.get(short.as_bytes())?
                && &holder[..] != id
            {
                return abort(JobClash::ShortIdTaken {
                    holder: String::from_utf8_lossy(&holder).into_owned(),
                });
            }
            shorts.insert(short.as_bytes(), id)?;
            jobs.insert(id, value.clone())?;
            for (k, v) in &targets {
                tgts.insert(k.as_slice(), v.clone())?;
            }
            Ok(())
        });
        tx_outcome(self, r)
    }

    fn put_job(&self, rec: &JobRecord) -> Result<(), StoreError> {
        self.insert(&self.trees()?.jobs, rec.id.as_bytes(), encode(rec))
    }

    fn get_job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        self.get(&self.trees()?.jobs, id)
    }

    fn job_id_by_short(&self, short: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .trees()?
            .job_short
            .get(short.as_bytes())
            .map_err(|e| self.fail(e))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    fn job_ids_with_prefix(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        self.trees()?
            .jobs
            .scan_prefix(prefix.as_bytes())
            .keys()
            .take(limit)
            .map(|k| Ok(String::from_utf8_lossy(&k.map_err(|e| self.fail(e))?).into_owned()))
            .collect()
    }

    fn list_jobs(&self, q: &JobQuery) -> Result<Vec<JobRecord>, StoreError> {
        use std::ops::Bound::{Excluded, Unbounded};
        let t = self.trees()?;
        let after = q.after.as_deref().map(str::as_bytes);
        let iter: KvIter = match (q.order, after) {
            (Order::NewestFirst, None) => Box::new(t.jobs.iter().rev()),
            (Order::NewestFirst, Some(a)) => Box::new(t.jobs.range(..a).rev()),
            (Order::OldestFirst, None) => Box::new(t.jobs.iter()),
            (Order::OldestFirst, Some(a)) => {
                Box::new(t.jobs.range::<&[u8], _>((Excluded(a), Unbounded)))
            }
        };
        q.take_from(iter.map(|kv| {
            let (k, v) = kv.map_err(|e| self.fail(e))?;
            decode(&k, &v)
        }))
    }

    fn delete_job(&self, id: &str) -> Result<u64, StoreError> {
        use sled::Transactional;
        let t = self.trees()?;
        let prefix = targets_prefix(id);
        let keys: Vec<sled::IVec> = t
            .targets
            .scan_prefix(prefix.as_bytes())
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| self.fail(e))?;
        let short = short_of(id.as_bytes());
        let r = (&t.jobs, &t.job_short, &t.targets).transaction(
            |(jobs, shorts, tgts)| -> sled::transaction::ConflictableTransactionResult<u64, ()> {
                let mut freed = 0u64;
                for k in &keys {
                    if let Some(v) = tgts.remove(k)? {
                        freed += (k.len() + v.len()) as u64;
                    }
                }
                if let Some(v) = jobs.remove(id.as_bytes())? {
                    freed += (id.len() + v.len()) as u64;
                }
                // Only if it names this job (an old store may have given it
                // to another one).
                if let Some(short) = &short
                    && shorts
                        .get(short.as_bytes())?
                        .is_some_and(|holder| &holder[..] == id.as_bytes())
                {
                    shorts.remove(short.as_bytes())?;
                }
                Ok(freed)
            },
        );
        Ok(tx_outcome(self, r)?.unwrap_or(0))
    }

    fn job_bytes(&self) -> Result<u64, StoreError> {
        let t = self.trees()?;
        let mut total = 0u64;
        for tree in [&t.jobs, &t.targets] {
            for kv in tree.iter() {
                let (k, v) = kv.map_err(|e| self.fail(e))?;
                total += (k.len() + v.len()) as u64;
            }
        }
        Ok(total)
    }

    fn put_target(&self, job: &str, agent: &str, rec: &TargetRecord) -> Result<(), StoreError> {
        self.insert(
            &self.trees()?.targets,
            &target_key(job, agent),
            encode_target(rec),
        )
    }

    fn put_targets(&self, job: &str, recs: &[(&str, &TargetRecord)]) -> Result<(), StoreError> {
        // Plain inserts: a `sled::Batch` takes sled's global write lock,
        // which waits for a running flush and then holds up every other
        // tree operation (results being recorded on the async workers).
        let targets = &self.trees()?.targets;
        for (agent, rec) in recs {
            targets
                .insert(target_key(job, agent), encode_target(rec))
                .map_err(|e| self.fail(e))?;
        }
        Ok(())
    }

    fn put_targets_if(
        &self,
        job: &str,
        from: fleetcmd_core::state::TargetState,
        recs: &[(&str, &TargetRecord)],
    ) -> Result<Vec<String>, StoreError> {
        let targets = &self.trees()?.targets;
        let mut written = Vec::new();
        for (agent, rec) in recs {
            let key = target_key(job, agent);
            let new = encode_target(rec);
            // Compare-and-swap on the bytes read: a write in between makes
            // the swap fail, and the state is checked again.
            loop {
                let old = targets.get(&key).map_err(|e| self.fail(e))?;
                let state = match &old {
                    Some(v) => decode_target(&key, v)?.state,
                    None => fleetcmd_core::state::TargetState::Pending,
                };
                if state != from {
                    break;
                }
                match targets
                    .compare_and_swap(&key, old, Some(new.clone()))
                    .map_err(|e| self.fail(e))?
                {
                    Ok(()) => {
                        written.push((*agent).to_owned());
                        break;
                    }
                    Err(_) => continue,
                }
            }
        }
        Ok(written)
    }

    fn get_target(&self, job: &str, agent: &str) -> Result<Option<TargetRecord>, StoreError> {
        let key = target_key(job, agent);
        self.trees()?
            .targets
            .get(&key)
            .map_err(|e| self.fail(e))?
            .map(|v| decode_target(&key, &v))
            .transpose()
    }

    fn targets(&self, job: &str) -> Result<Vec<(String, TargetRecord)>, StoreError> {
        let prefix = targets_prefix(job);
        self.trees()?
            .targets
            .scan_prefix(prefix.as_bytes())
            .map(|kv| {
                let (k, v) = kv.map_err(|e| self.fail(e))?;
                let agent = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                Ok((agent, decode_target(&k, &v)?))
            })
            .collect()
    }
}

impl AuditStore for SledStore {
    fn audit_append(&self, rec: &Record, index: &[AuditIndexEntry]) -> Result<(), StoreError> {
        let t = self.trees()?;
        let conflict = |reason: String| StoreError::Conflict {
            what: format!("audit record {}", rec.seq),
            reason,
        };
        let mut tip = t.audit_tip.lock().unwrap_or_else(|p| p.into_inner());
        if *tip == AuditTip::Unread {
            *tip = match t.audit.last().map_err(|e| self.fail(e))? {
                Some((k, _)) => AuditTip::At(seq_of(&k)),
                None => AuditTip::Empty,
            };
        }
        if let AuditTip::At(last) = *tip
            && last.checked_add(1) != Some(rec.seq)
        {
            return Err(conflict(format!("the newest record is {last}")));
        }
        if t.audit
            .compare_and_swap(
                seq_key(rec.seq),
                None as Option<&[u8]>,
                Some(crate::audit::codec::encode(rec)),
            )
            .map_err(|e| self.fail(e))?
            .is_err()
        {
            // Written past this open (a tool on the raw tree): read again.
            *tip = AuditTip::Unread;
            return Err(conflict("a record with this seq exists".into()));
        }
        *tip = AuditTip::At(rec.seq);
        drop(tip);
        // Plain inserts, not a `sled::Batch`: sled 0.34 writes out and
        // syncs its current log buffer before and after every batch (and
        // takes a lock that stops every other tree operation meanwhile),
        // which cost two log writes per audit record. The index does not
        // need a batch's atomicity: it is made durable by the same flush
        // as its record, and `Audit::open` re-indexes the newest records
        // after a crash.
        self.audit_put_index(index)
    }

    /// One process writes a sled store, and the flush that makes a record
    /// durable makes the entries written before it durable too.
    fn audit_index_after_append(&self) -> bool {
        true
    }

    fn audit_put_index(&self, index: &[AuditIndexEntry]) -> Result<(), StoreError> {
        let t = self.trees()?;
        for e in index {
            t.audit_index
                .insert(index_key(e), &[][..])
                .map_err(|e| self.fail(e))?;
        }
        Ok(())
    }

    fn audit_last(&self) -> Result<Option<Record>, StoreError> {
        self.trees()?
            .audit
            .last()
            .map_err(|e| self.fail(e))?
            .map(|(k, v)| decode_record(&k, &v))
            .transpose()
    }

    fn audit_first_seq(&self) -> Result<Option<u64>, StoreError> {
        Ok(self
            .trees()?
            .audit
            .first()
            .map_err(|e| self.fail(e))?
            .map(|(k, _)| seq_of(&k)))
    }

    fn audit_get(&self, seq: u64) -> Result<Option<Record>, StoreError> {
        let k = seq_key(seq);
        self.trees()?
            .audit
            .get(k)
            .map_err(|e| self.fail(e))?
            .map(|v| decode_record(&k, &v))
            .transpose()
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
        let t = self.trees()?;
        let range = t.audit.range(seq_key(from)..seq_key(to));
        let iter: KvIter = match order {
            Order::OldestFirst => Box::new(range),
            Order::NewestFirst => Box::new(range.rev()),
        };
        iter.take(limit)
            .map(|kv| {
                let (k, v) = kv.map_err(|e| self.fail(e))?;
                decode_record(&k, &v)
            })
            .collect()
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
        self.trees()?
            .audit_index
            .range(lo..hi)
            .keys()
            .rev()
            .take(limit)
            .map(|k| {
                let k = k.map_err(|e| self.fail(e))?;
                Ok((time_of(&k), seq_of(&k)))
            })
            .collect()
    }

    fn audit_remove_through(
        &self,
        through: u64,
        index: &[AuditIndexEntry],
    ) -> Result<(), StoreError> {
        let t = self.trees()?;
        for e in index {
            t.audit_index
                .remove(index_key(e))
                .map_err(|e| self.fail(e))?;
        }
        let keys: Vec<sled::IVec> = t
            .audit
            .range(..=seq_key(through))
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| self.fail(e))?;
        for k in keys {
            t.audit.remove(k).map_err(|e| self.fail(e))?;
        }
        // Retention may have removed the newest record too: read it again.
        *t.audit_tip.lock().unwrap_or_else(|p| p.into_inner()) = AuditTip::Unread;
        Ok(())
    }

    fn audit_put_head(&self, head: &SignedHead) -> Result<(), StoreError> {
        self.insert(
            &self.trees()?.audit_heads,
            &seq_key(head.seq),
            encode_head(head),
        )
    }

    fn audit_heads_from(&self, from: u64) -> Result<Vec<SignedHead>, StoreError> {
        self.trees()?
            .audit_heads
            .range(seq_key(from)..)
            .map(|kv| {
                let (k, v) = kv.map_err(|e| self.fail(e))?;
                decode_head(&k, &v)
            })
            .collect()
    }

    fn audit_last_head_seq(&self) -> Result<Option<u64>, StoreError> {
        Ok(self
            .trees()?
            .audit_heads
            .last()
            .map_err(|e| self.fail(e))?
            .map(|(k, _)| seq_of(&k)))
    }

    fn audit_remove_heads_before(&self, before: u64) -> Result<(), StoreError> {
        let t = self.trees()?;
        let keys: Vec<sled::IVec> = t
            .audit_heads
            .range(..seq_key(before))
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| self.fail(e))?;
        for k in keys {
            t.audit_heads.remove(k).map_err(|e| self.fail(e))?;
        }
        Ok(())
    }
}

impl HealthStore for SledStore {
    fn health_state(&self, name: &str) -> Result<Option<HealthRecord>, StoreError> {
        let key = state_key(name);
        self.trees()?
            .health
            .get(&key)
            .map_err(|e| self.fail(e))?
            .map(|v| decode(&key, &v))
            .transpose()
    }

    fn put_health_state(&self, name: &str, rec: &HealthRecord) -> Result<(), StoreError> {
        self.insert(&self.trees()?.health, &state_key(name), encode(rec))
    }

    fn add_health_transition(
        &self,
        name: &str,
        tr: &HealthTransition,
        keep: usize,
    ) -> Result<(), StoreError> {
        let t = self.trees()?;
        self.insert(&t.health, &history_key(name, tr.at_ms), encode(tr))?;
        let keys: Vec<sled::IVec> = t
            .health
            .scan_prefix(history_prefix(name))
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| self.fail(e))?;
        if keys.len() > keep {
            for k in &keys[..keys.len() - keep] {
                t.health.remove(k).map_err(|e| self.fail(e))?;
            }
        }
        Ok(())
    }

    fn health_transitions(
        &self,
        name: &str,
        limit: usize,
    ) -> Result<Vec<HealthTransition>, StoreError> {
        self.scan(
            self.trees()?
                .health
                .scan_prefix(history_prefix(name))
                .rev()
                .take(limit),
        )
    }
}

impl RevocationStore for SledStore {
    fn put_revocation(&self, rec: &CertRevocation) -> Result<(), StoreError> {
        self.insert(
            &self.trees()?.revoked_certs,
            rec.key().as_bytes(),
            encode(rec),
        )
    }

    fn revocations(&self) -> Result<Vec<CertRevocation>, StoreError> {
        self.scan(self.trees()?.revoked_certs.iter())
    }
}

#[cfg(test)]
mod tests {
    use fleetcmd_core::state::TargetState;

    use super::super::records::TARGET_V2;
    use super::*;

    #[test]
    fn target_records_are_compact_and_json_ones_of_earlier_versions_still_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let with_result = TargetRecord {
            result: Some((0..=255u8).collect()),
            dispatched_at: 1_764_000_000,
            ..TargetRecord::new(TargetState::Failed, "exit code 2")
        };
        for rec in [
            TargetRecord::new(TargetState::Dispatched, ""),
            with_result.clone(),
            TargetRecord::new(TargetState::Skipped, "the job was aborted"),
        ] {
            store.put_target("j1", "web-1", &rec).expect("put");
            assert_eq!(store.get_target("j1", "web-1").expect("get"), Some(rec));
        }
        let compact = store
            .trees()
            .expect("trees")
            .targets
            .get(b"j1/web-1")
            .expect("raw");
        let json_len = encode(&with_result).len();
        let compact_len = compact.expect("stored").len();
        assert!(compact_len < json_len, "{compact_len} >= {json_len}");
        // A record as the JSON format wrote it.
        store
            .trees()
            .expect("trees")
            .targets
            .insert(b"j2/web-2", encode(&with_result))
            .expect("raw insert");
        assert_eq!(
            store.get_target("j2", "web-2").expect("get"),
            Some(with_result.clone())
        );
        assert_eq!(
            store.targets("j2").expect("targets"),
            vec![("web-2".to_owned(), with_result)]
        );
        // Neither format: a clear error, not a panic.
        store
            .trees()
            .expect("trees")
            .targets
            .insert(b"j3/web-3", &[TARGET_V2, 0xff, 0xff][..])
            .expect("raw insert");
        assert!(matches!(
            store.get_target("j3", "web-3"),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_database_held_open_elsewhere_is_refused_after_the_lock_wait() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _held = SledStore::open(dir.path()).expect("open");
        let started = std::time::Instant::now();
        let err = SledStore::open(dir.path()).expect_err("second open");
        assert!(started.elapsed() >= LOCK_WAIT, "{:?}", started.elapsed());
        let text = err.to_string();
        assert!(text.contains("could not acquire lock"), "{text}");
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
    }

    /// Two v7 ids of one millisecond with the same random tail.
    const A: &str = "01890a5d-ac96-774b-bcce-b302099a8057";
    const B: &str = "01890a5d-ac96-7001-8000-b302099a8057";
    const C: &str = "01890a5d-ac96-7002-8000-000000000001";

    #[test]
    fn a_store_of_an_earlier_version_is_indexed_once_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            // What an earlier version wrote: jobs, no short id index.
            let db = sled::open(dir.path()).expect("sled");
            let jobs = db.open_tree("jobs").expect("tree");
            for id in [A, B, C] {
                jobs.insert(id, &b"{}"[..]).expect("insert");
            }
            db.flush().expect("flush");
        }
        let store = SledStore::open(dir.path()).expect("open");
        // A and B share a short id: the older (the first key: B) keeps it.
        let lookups = |store: &SledStore| {
            ["b302099a8057", "000000000001"].map(|short| store.job_id_by_short(short).expect("get"))
        };
        let want = [Some(B.to_string()), Some(C.to_string())];
        assert_eq!(lookups(&store), want);
        store.close();
        drop(store);
        let store = SledStore::open(dir.path()).expect("reopen");
        assert_eq!(lookups(&store), want);
    }

    /// The tip an append checks against is the one this open wrote, but
    /// read again when the log changed past it: a record written into the
    /// tree directly (the append of that seq is refused, the next one
    /// continues after it), and retention that emptied the log (any seq
    /// continues an empty log).
    #[test]
    fn audit_appends_follow_the_stored_tip_after_outside_writes_and_retention() {
        use fleetcmd_core::audit::{Chain, Event, EventKind};

        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let event = |i: u64| Event::new(EventKind::ChatDenied, format!("console:u{i}"));
        let mut chain = Chain::genesis();
        let recs: Vec<Record> = (1..=3).map(|i| chain.append(i, event(i))).collect();
        for r in &recs {
            store.audit_append(r, &[]).expect("append");
        }
        // Record 4 written past the store (a tool on the raw tree).
        let mut outside = chain.clone();
        let r4 = outside.append(4, event(4));
        store
            .raw_tree("audit")
            .expect("tree")
            .insert(seq_key(4), crate::audit::codec::encode(&r4))
            .expect("raw insert");
        let err = store.audit_append(&r4, &[]).expect_err("seq 4 exists");
        assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
        let r5 = outside.append(5, event(5));
        store
            .audit_append(&r5, &[])
            .expect("5 follows the stored 4");
        // Retention removes every record: the next append may have any seq.
        store.audit_remove_through(5, &[]).expect("remove");
        assert_eq!(store.audit_last().expect("last"), None);
        let r9 = Chain::after(&r5).append(9, event(9));
        let later = Record { seq: 9, ..r9 };
        store
            .audit_append(&later, &[])
            .expect("an empty log takes any seq");
        assert_eq!(store.audit_last().expect("last").map(|r| r.seq), Some(9));
        // Out of sequence after it is refused again.
        let mut gap = later.clone();
        gap.seq = 11;
        let err = store.audit_append(&gap, &[]).expect_err("gap");
        assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    }

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = SledStore::open(dir.path()).expect("open");
            store
                .put_target(
                    "j1",
                    "web-1",
                    &TargetRecord {
                        result: Some(vec![1, 2]),
                        ..TargetRecord::new(TargetState::Ok, "")
                    },
                )
                .expect("put");
            store.flush().expect("flush");
        }
        let store = SledStore::open(dir.path()).expect("reopen");
        assert_eq!(store.targets("j1").expect("targets").len(), 1);
    }
}
