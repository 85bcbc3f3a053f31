//! The audit trail's durable half: records in the audit part of the
//! controller's store (`AuditStore`), so the `flush` that makes an action
//! durable makes its audit record durable too; secondary indexes for search; chain
//! heads signed with the controller's audit key (generated on first start
//! in `DATA_DIR/audit/`); and the one place events are logged, so the logs
//! and the trail never disagree.
//!
//! The store keeps records by seq (the sled backend in `codec`'s compact
//! form), index entries (dims: actor, host, command, job, kind; this module
//! decides which a record gets) and signed heads. Records are never
//! rewritten; the time of a record never decreases along the chain, so
//! seq order is also time order.

pub mod codec;
pub mod export;
pub mod service;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleetcmd_core::audit::{
    Broken, Chain, Event, EventKind, Filter, Record, SignedHead, Verified, verify_chain,
    verify_options,
};
use fleetcmd_core::crypto::{PublicKey, SigningKey};
use fleetcmd_core::ids::JobRef;

use crate::store::{AuditDim as Dim, AuditIndexEntry, Fence, Order, Store, StoreError};

/// How often the chain head is signed when records were added.
pub const HEAD_INTERVAL: Duration = Duration::from_secs(60);
/// Records a search examines at most per call; beyond it the page ends
/// early with a cursor, so one query cannot pin the controller.
pub const MAX_SCAN: usize = 200_000;
/// Largest page.
pub const MAX_PAGE: usize = 1000;
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("audit key {path}: {reason}")]
    Key { path: String, reason: String },
}

/// Kinds a client (the gateway) may report; the controller records the
/// others itself.
pub fn reportable(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::ChatDenied
            | EventKind::ChatCommand
            | EventKind::AuthFailed
            | EventKind::ApprovalRequested
            | EventKind::ApprovalGiven
            | EventKind::ApprovalDenied
            | EventKind::ApprovalExpired
            | EventKind::ApprovalDropped
            | EventKind::JobCanceled
    )
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Logs an event: the single place audit events reach the logs.
pub fn log_event(e: &Event) {
    let hosts = e.hosts.join(",");
    if e.kind.is_refusal() {
        tracing::warn!(target: "fleetcmd::security", kind = %e.kind, actor = %e.actor, source = %e.source, job_id = %e.job_id, command = %e.command, hosts, detail = %e.detail, "security event");
    } else {
        tracing::info!(target: "fleetcmd::audit", kind = %e.kind, actor = %e.actor, source = %e.source, job_id = %e.job_id, command = %e.command, hosts, detail = %e.detail, "audit event");
    }
}

/// One page of search results, newest first.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub records: Vec<Record>,
    /// Pass as `before_seq` for the next page; `None` when there is no more.
    pub next_before: Option<u64>,
}

pub struct Audit {
    store: Arc<dyn Store>,
    key: SigningKey,
    public: PublicKey,
    dir: PathBuf,
    /// The tip; appends are serialized by this lock.
    chain: Mutex<Chain>,
    /// Sequence number and time of the last signed head.
    last_head: Mutex<(u64, Instant)>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("dir", &self.dir)
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// The host an `agent:NAME` actor is, when the record is also about that
/// host: then the actor index entry would duplicate the host entry (every
/// per-agent result, `job_finished`), so it is left out and a search by that
/// actor reads the host index too (`Audit::search`).
fn actor_is_own_host(e: &Event) -> bool {
    e.actor
        .strip_prefix("agent:")
        .is_some_and(|name| e.hosts.iter().any(|h| h == name))
}

/// The records of `events` appended to `chain` at `now_ms`, each with
/// its index entries.
pub(crate) fn make_records(
    chain: &mut Chain,
    now_ms: u64,
    events: &[Event],
) -> Vec<(Record, Vec<AuditIndexEntry>)> {
    events
        .iter()
        .map(|e| {
            let rec = chain.append(now_ms, e.clone());
            let index = index_entries(&rec, false);
            (rec, index)
        })
        .collect()
}

/// The index entries of a record. `all` adds the actor entry that
/// `actor_is_own_host` leaves out (earlier versions wrote it; retention
/// removes it too).
pub(crate) fn index_entries(r: &Record, all: bool) -> Vec<AuditIndexEntry> {
    let e = &r.event;
    let entry = |dim, value: &str| AuditIndexEntry {
        dim,
        value: value.to_owned(),
        time_ms: r.time_ms,
        seq: r.seq,
    };
    let mut out = vec![entry(Dim::Kind, e.kind.as_str())];
    if all || !actor_is_own_host(e) {
        out.push(entry(Dim::Actor, &e.actor));
    }
    if !e.command.is_empty() {
        out.push(entry(Dim::Command, &e.command));
    }
    if !e.job_id.is_empty() {
        out.push(entry(Dim::Job, &e.job_id));
    }
    for h in &e.hosts {
        out.push(entry(Dim::Host, h));
    }
    out
}

/// Index entries read per store call while a search merges them.
const INDEX_PAGE: usize = 512;

/// One index range read newest first, a page at a time.
struct IndexCursor<'a> {
    store: &'a dyn Store,
    dim: Dim,
    value: String,
    since_ms: u64,
    /// Exclusive upper bound `(time, seq)` of the next page.
    before: (u64, u64),
    page: std::collections::VecDeque<(u64, u64)>,
    done: bool,
}

impl IndexCursor<'_> {
    fn peek(&mut self) -> Result<Option<(u64, u64)>, StoreError> {
        if self.page.is_empty() && !self.done {
            let page = self.store.audit_index_page(
                self.dim,
                &self.value,
                self.since_ms,
                self.before,
                INDEX_PAGE,
            )?;
            self.done = page.len() < INDEX_PAGE;
            if let Some(&last) = page.last() {
                self.before = last;
            }
            self.page.extend(page);
        }
        Ok(self.page.front().copied())
    }
}

/// The stored records from a seq on, read a page at a time (verifying a
/// whole trail never holds it in memory).
struct VerifyRecords<'a> {
    store: &'a dyn Store,
    next: u64,
    page: std::collections::VecDeque<Record>,
    done: bool,
}

impl Iterator for VerifyRecords<'_> {
    type Item = Result<Record, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.page.is_empty() && !self.done {
            match self
                .store
                .audit_records(self.next, u64::MAX, Order::OldestFirst, INDEX_PAGE)
            {
                Ok(page) => {
                    self.done = page.len() < INDEX_PAGE;
                    if let Some(last) = page.last() {
                        self.next = last.seq + 1;
                    }
                    self.page.extend(page);
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        self.page.pop_front().map(Ok)
    }
}

/// Loads the audit key from `dir/audit.key`, creating it (and `audit.pub`)
/// on first start.
fn load_or_create_key(dir: &Path) -> Result<SigningKey, AuditError> {
    let path = dir.join("audit.key");
    let err = |reason: String| AuditError::Key {
        path: path.display().to_string(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    let key = match std::fs::read(&path) {
        Ok(der) => SigningKey::from_pkcs8_der(&der).map_err(|e| err(e.to_string()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let doc =
                ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                    .map_err(|_| err("random source failed".into()))?;
            let tmp = dir.join("audit.key.tmp");
            {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(|e| err(e.to_string()))?;
                f.write_all(doc.as_ref()).map_err(|e| err(e.to_string()))?;
                f.sync_all().map_err(|e| err(e.to_string()))?;
            }
            std::fs::rename(&tmp, &path).map_err(|e| err(e.to_string()))?;
            SigningKey::from_pkcs8_der(doc.as_ref()).map_err(|e| err(e.to_string()))?
        }
        Err(e) => return Err(err(e.to_string())),
    };
    std::fs::write(dir.join("audit.pub"), format!("{}\n", key.public_key()))
        .map_err(|e| err(format!("writing audit.pub: {e}")))?;
    Ok(key)
}

impl Audit {
    /// Opens the trail in `store` with the key in `dir` (created on first
    /// start), restores the chain tip, and re-indexes the newest records
    /// (an index entry may have missed the last flush before a crash).
    pub fn open(store: Arc<dyn Store>, dir: &Path) -> Result<Audit, AuditError> {
        let key = load_or_create_key(dir)?;
        let tip = store.audit_last()?;
        let chain = match &tip {
            Some(last) => Chain::after(last),
            None => Chain::genesis(),
        };
        let newest = tip.map_or(0, |r| r.seq);
        for r in store.audit_records(
            newest.saturating_sub(999),
            newest + 1,
            Order::OldestFirst,
            1000,
        )? {
            store.audit_put_index(&index_entries(&r, false))?;
        }
        let last_signed = store.audit_last_head_seq()?.unwrap_or(0);
        Ok(Audit {
            public: key.public_key(),
            key,
            store,
            dir: dir.to_owned(),
            chain: Mutex::new(chain),
            last_head: Mutex::new((last_signed, Instant::now())),
        })
    }

    /// The public half of the audit key (`DATA_DIR/audit/audit.pub`).
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sequence number of the newest record (0 = empty).
    pub fn last_seq(&self) -> u64 {
        lock(&self.chain).seq
    }

    /// Logs the event and appends it. Not yet durable: the caller's next
    /// store `flush` makes it so (and must come before acknowledging the
    /// action the event records).
    pub fn record(&self, event: Event) -> Result<u64, StoreError> {
        log_event(&event);
        self.append_at(now_ms(), event)
    }

    /// Appends without logging, at a given time (benchmarks, imports).
    pub fn append_at(&self, now_ms: u64, event: Event) -> Result<u64, StoreError> {
        // The chain lock covers the hash and the append (records reach the
        // log in sequence order within this process). The store refuses a
        // record out of sequence (PostgreSQL: the seq check and the insert
        // under one advisory lock, for every controller); the tip only
        // moves once a record is stored.
        // Where the store allows it (`audit_index_after_append`: sled), the
        // index entries are written after the chain lock is let go: with
        // them under it, every append waited for a submission's entry per
        // host, and results for a dispatch chunk's 256.
        let index_apart = self.store.audit_index_after_append();
        let mut chain = lock(&self.chain);
        let mut next = chain.clone();
        let rec = next.append(now_ms, event);
        let index = index_entries(&rec, false);
        let with_record: &[AuditIndexEntry] = if index_apart { &[] } else { &index };
        match self.store.audit_append(&rec, with_record) {
            Ok(()) => {
                *chain = next;
                drop(chain);
                if index_apart {
                    self.store.audit_put_index(&index)?;
                }
                Ok(rec.seq)
            }
            // The stored tip is not ours: another controller appended
            // (several writers on one database), or a record we appended
            // was lost with a write that failed before it was durable
            // (never acknowledged: a full disk, the database reopened) —
            // found by the full-disk test, whose chain stayed one ahead of
            // the store and refused every record after the disk freed. The
            // chain goes on from the stored tip: the record is made again
            // after it, under the store's append lock, so two writers
            // never fork the chain and this one cannot lose again (a
            // writer that only reread the tip and tried again lost to one
            // that never needs to, 64 times in a row, in CI). The event
            // moves into the record and back out of it: no copy per
            // append.
            Err(StoreError::Conflict { .. }) => {
                let ours = chain.seq;
                let rec = self.store.audit_append_at_tip(now_ms, rec.event)?;
                tracing::debug!(
                    ours,
                    stored = rec.seq,
                    "audit chain resumed from the stored tip"
                );
                *chain = Chain::after(&rec);
                Ok(rec.seq)
            }
            Err(e) => Err(e),
        }
    }

    /// Stores `writes` (target writes from state `from`, as
    /// `Store::put_targets_audited`) with the records of `events`, in
    /// order, in one atomic step, then logs the events. `Ok(Err(lost))`:
    /// the writes at those indexes found another state; nothing was
    /// stored and the chain did not move. When another controller
    /// appended first (`Conflict`), the records are made again after the
    /// stored tip under the store's append lock, as in `append_at`.
    /// Returns the last record's sequence number.
    pub fn record_targets(
        &self,
        events: &[Event],
        from: fleetcmd_core::state::TargetState,
        writes: &[crate::store::TargetWrite<'_>],
    ) -> Result<Result<u64, Vec<usize>>, StoreError> {
        let now = now_ms();
        let mut chain = lock(&self.chain);
        let mut next = chain.clone();
        let records = make_records(&mut next, now, events);
        let stored = match self.store.put_targets_audited(from, writes, &records) {
            Ok(Ok(())) => next,
            Ok(Err(lost)) => return Ok(Err(lost)),
            Err(StoreError::Conflict { .. }) => {
                drop(records);
                match self
                    .store
                    .put_targets_audited_at_tip(from, writes, now, events)?
                {
                    Ok(stored) => {
                        tracing::debug!(
                            ours = chain.seq,
                            stored = stored.seq,
                            "audit chain resumed from the stored tip"
                        );
                        stored
                    }
                    Err(lost) => return Ok(Err(lost)),
                }
            }
            Err(e) => return Err(e),
        };
        let last = stored.seq;
        *chain = stored;
        drop(chain);
        events.iter().for_each(log_event);
        Ok(Ok(last))
    }

    pub fn get(&self, seq: u64) -> Result<Option<Record>, StoreError> {
        self.store.audit_get(seq)
    }

    /// Records with `seq >= from`, in order, at most `limit`.
    pub fn records_from(&self, from: u64, limit: usize) -> Result<Vec<Record>, StoreError> {
        self.store
            .audit_records(from, u64::MAX, Order::OldestFirst, limit)
    }

    /// Signed heads covering `seq >= from`.
    pub fn heads_from(&self, from: u64) -> Result<Vec<SignedHead>, StoreError> {
        self.store.audit_heads_from(from)
    }

    /// Signs the current head if records were added since the last one.
    /// Durable after the next flush.
    pub fn sign_head(&self) -> Result<Option<SignedHead>, StoreError> {
        self.sign_with(|head| self.store.audit_put_head(head))
    }

    /// Signs the current head if it is new and stores it with `put`.
    fn sign_with(
        &self,
        put: impl FnOnce(&SignedHead) -> Result<(), StoreError>,
    ) -> Result<Option<SignedHead>, StoreError> {
        let chain = lock(&self.chain).clone();
        let mut last = lock(&self.last_head);
        if chain.seq == 0 || chain.seq <= last.0 {
            return Ok(None);
        }
        let head = SignedHead::sign(&chain, now_ms(), &self.key);
        put(&head)?;
        *last = (chain.seq, Instant::now());
        Ok(Some(head))
    }

    /// `sign_head` as the holder of the audit-heads lease: the store
    /// refuses the write when `fence` is no longer the current grant (a
    /// controller that lost its lease), and nothing is signed then.
    pub fn sign_head_fenced(&self, fence: &Fence) -> Result<Option<SignedHead>, StoreError> {
        self.sign_with(|head| {
            if self.store.audit_put_head_fenced(fence, head)? {
                Ok(())
            } else {
                Err(StoreError::Conflict {
                    what: format!("audit head {}", head.seq),
                    reason: format!(
                        "lease {} is no longer held at term {}",
                        fence.lease, fence.term
                    ),
                })
            }
        })
    }

    /// Retention: removes the oldest records whose time is
    /// before `before_ms` — never past `max_seq` (what every exporter
    /// already has) nor the newest record (it anchors the chain tip), at
    /// most `batch` per call. First it stores and flushes the retention
    /// checkpoint, a signed head for the last record it removes, so the
    /// rest of the trail still verifies from there (`verify_options`);
    /// a crash part-way leaves records the checkpoint already covers, which
    /// the next call removes. Returns the number of records removed.
    pub fn prune(&self, before_ms: u64, max_seq: u64, batch: usize) -> Result<u64, StoreError> {
        let tip = lock(&self.chain).seq;
        let limit = max_seq.min(tip.saturating_sub(1));
        let candidates =
            self.store
                .audit_records(0, limit.saturating_add(1), Order::OldestFirst, batch)?;
        let doomed: Vec<Record> = candidates
            .into_iter()
            .take_while(|r| r.time_ms < before_ms)
            .collect();
        let Some(last) = doomed.last() else {
            return Ok(0);
        };
        let n = doomed.len() as u64;
        let checkpoint = SignedHead::sign(&Chain::after(last), now_ms(), &self.key);
        self.store.audit_put_head(&checkpoint)?;
        self.store.flush()?;
        let index: Vec<AuditIndexEntry> =
            doomed.iter().flat_map(|r| index_entries(r, true)).collect();
        self.store.audit_remove_through(last.seq, &index)?;
        self.store.audit_remove_heads_before(last.seq)?;
        self.store.flush()?;
        let last = last.clone();
        tracing::info!(
            removed = n,
            checkpoint_seq = last.seq,
            "audit retention: removed the oldest records"
        );
        Ok(n)
    }

    /// The first record still stored (after retention), if any.
    pub fn first_seq(&self) -> Result<Option<u64>, StoreError> {
        self.store.audit_first_seq()
    }

    /// Periodic work (called every second by the controller's sweeper
    /// while it holds the audit-heads lease, `fence`): signs the head every
    /// `HEAD_INTERVAL` when there is something new, and makes it durable.
    pub async fn tick(&self, fence: &Fence) -> Result<(), StoreError> {
        let due = lock(&self.last_head).1.elapsed() >= HEAD_INTERVAL;
        if due && self.sign_head_fenced(fence)?.is_some() {
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || store.flush())
                .await
                .map_err(|e| StoreError::Backend(format!("flush task: {e}")))??;
        }
        Ok(())
    }

    /// Verifies the stored trail (records from `from`, or all) and its
    /// signed heads with this controller's key.
    pub fn verify(&self, from: Option<u64>) -> Result<Result<Verified, Broken>, StoreError> {
        let heads = self.heads_from(0)?;
        let opts = match verify_options(self.first_seq()?, &heads, Some(&self.public), from) {
            Ok(o) => o,
            Err(broken) => return Ok(Err(broken)),
        };
        let iter = VerifyRecords {
            store: self.store.as_ref(),
            next: opts.from.unwrap_or(0),
            page: Default::default(),
            done: false,
        };
        Ok(verify_chain(iter, &heads, Some(&self.public), &opts))
    }

    /// The first seq whose time is `>= t` (records are in time order).
    fn first_seq_at(&self, t: u64) -> Result<u64, StoreError> {
        let first = match self.store.audit_first_seq()? {
            Some(seq) => seq,
            None => return Ok(1),
        };
        let (mut lo, mut hi) = (first, lock(&self.chain).seq + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let time = match self.store.audit_get(mid)? {
                Some(r) => r.time_ms,
                None => u64::MAX,
            };
            if time < t {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    /// Searches newest first. Uses the most selective index the filter
    /// allows (job, actor, host, command, one kind), else the time order of
    /// the records; every candidate is checked against the whole filter.
    pub fn search(
        &self,
        f: &Filter,
        limit: usize,
        before_seq: Option<u64>,
    ) -> Result<Page, StoreError> {
        self.search_where(f, limit, before_seq, &mut |_| true)
    }

    /// [`Audit::search`] keeping only the records `keep` accepts (what the
    /// asker may read), so a page is filled with readable records.
    pub fn search_where(
        &self,
        f: &Filter,
        limit: usize,
        before_seq: Option<u64>,
        keep: &mut dyn FnMut(&Record) -> bool,
    ) -> Result<Page, StoreError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let mut out = Vec::new();
        let mut scanned = 0usize;
        let mut last_seen: Option<u64> = None;
        let mut push = |r: Record, out: &mut Vec<Record>| -> bool {
            scanned += 1;
            last_seen = Some(r.seq);
            if f.matches(&r) && keep(&r) {
                out.push(r);
            }
            out.len() >= limit || scanned >= MAX_SCAN
        };
        // A job named by its full or short id reads the job's index; a
        // short id whose job retention deleted, or a prefix, scans.
        let job = match &f.job_id {
            Some(JobRef::Full(id)) => Some(id.to_string()),
            Some(JobRef::Short(short)) => self.store.job_id_by_short(short.as_str())?,
            _ => None,
        };
        let dim = if let Some(j) = job {
            Some((Dim::Job, j))
        } else if let Some(a) = f.actor.as_ref().filter(|a| !a.ends_with('*')) {
            Some((Dim::Actor, a.clone()))
        } else if let Some(h) = &f.host {
            Some((Dim::Host, h.clone()))
        } else if let Some(c) = &f.command {
            Some((Dim::Command, c.clone()))
        } else if f.kinds.len() == 1 {
            Some((Dim::Kind, f.kinds[0].as_str().to_owned()))
        } else {
            None
        };
        let before_time = match before_seq {
            Some(s) => Some(self.get(s)?.map(|r| r.time_ms).unwrap_or(u64::MAX)),
            None => None,
        };
        let mut stopped_early = false;
        if let Some((dim, value)) = dim {
            // An agent's own results are indexed under its host only
            // (`actor_is_own_host`): a search by `agent:NAME` reads both.
            let mut ranges = vec![(dim, value.clone())];
            if let (Dim::Actor, Some(host)) = (dim, value.strip_prefix("agent:")) {
                ranges.push((Dim::Host, host.to_owned()));
            }
            let before = match (before_seq, before_time) {
                (Some(s), Some(t)) if f.until_ms.is_none_or(|u| t < u) => (t, s),
                _ => (f.until_ms.unwrap_or(u64::MAX), 0),
            };
            let mut ranges: Vec<IndexCursor<'_>> = ranges
                .into_iter()
                .map(|(dim, value)| IndexCursor {
                    store: self.store.as_ref(),
                    dim,
                    value,
                    since_ms: f.since_ms.unwrap_or(0),
                    before,
                    page: Default::default(),
                    done: false,
                })
                .collect();
            let mut previous: Option<u64> = None;
            loop {
                // Newest first across the ranges: by (time, seq).
                let mut best: Option<(usize, (u64, u64))> = None;
                for (i, r) in ranges.iter_mut().enumerate() {
                    let Some(at) = r.peek()? else { continue };
                    if best.is_none_or(|(_, b)| at > b) {
                        best = Some((i, at));
                    }
                }
                let Some((i, (_, seq))) = best else { break };
                ranges[i].page.pop_front();
                if previous == Some(seq) {
                    continue; // indexed under both (written by earlier versions)
                }
                previous = Some(seq);
                if before_seq.is_some_and(|b| seq >= b) {
                    continue;
                }
                let Some(r) = self.store.audit_get(seq)? else {
                    continue;
                };
                if push(r, &mut out) {
                    stopped_early = true;
                    break;
                }
            }
        } else {
            let lo = match f.since_ms {
                Some(t) => self.first_seq_at(t)?,
                None => 0,
            };
            let mut hi = match f.until_ms {
                Some(t) => self.first_seq_at(t)?,
                None => u64::MAX,
            };
            if let Some(b) = before_seq {
                hi = hi.min(b);
            }
            'pages: while lo < hi {
                let page = self
                    .store
                    .audit_records(lo, hi, Order::NewestFirst, INDEX_PAGE)?;
                let Some(oldest) = page.last().map(|r| r.seq) else {
                    break;
                };
                let full = page.len() >= INDEX_PAGE;
                for r in page {
                    if push(r, &mut out) {
                        stopped_early = true;
                        break 'pages;
                    }
                }
                if !full {
                    break;
                }
                hi = oldest;
            }
        }
        Ok(Page {
            next_before: if stopped_early { last_seen } else { None },
            records: out,
        })
    }

    /// Appends an event reported by a client (the gateway's chat denials,
    /// approvals and failed chat signatures), recording who reported it.
    /// Only `reportable` kinds are accepted (the caller checks).
    pub fn report(&self, mut event: Event, reporter: &str) -> Result<u64, StoreError> {
        event
            .fields
            .insert("reported_by".into(), reporter.to_owned());
        self.record(event)
    }
}

/// How a certificate holder appears as an actor: operators by their CLI
/// identity (as their jobs' requester), others by role and name.
pub fn peer_actor(peer: &crate::pki::Peer) -> String {
    match peer.role {
        crate::pki::Role::Operator => format!("cli:{}", peer.name),
        crate::pki::Role::Gateway => format!("gateway:{}", peer.name),
        crate::pki::Role::Agent => format!("agent:{}", peer.name),
    }
}
