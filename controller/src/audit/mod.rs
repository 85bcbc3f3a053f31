//! The audit trail's durable half: records in their own trees of
//! the controller's database, so the `flush` that makes an action durable
//! makes its audit record durable too; secondary indexes for search; chain
//! heads signed with the controller's audit key (generated on first start
//! in `DATA_DIR/audit/`); and the one place events are logged, so the logs
//! and the trail never disagree.
//!
//! Trees: `audit` (big-endian seq → record, in `codec`'s compact form), `audit_index`
//! (`dim value 0x00 time seq` → empty; dims: actor, host, command, job,
//! kind), `audit_heads` (seq → signed head JSON), `audit_meta` (exporter
//! cursors). Records are never rewritten; the time of a record never
//! decreases along the chain, so the records tree is also in time order.

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

use crate::store::{Store, StoreError};

const RECORDS: &str = "audit";
const INDEX: &str = "audit_index";
const HEADS: &str = "audit_heads";
#[allow(dead_code)]
pub(crate) const META: &str = "audit_meta";

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

impl From<sled::Error> for AuditError {
    fn from(e: sled::Error) -> Self {
        AuditError::Store(StoreError::Backend(e.to_string()))
    }
}

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
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

fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

#[derive(Clone, Copy)]
enum Dim {
    Actor = b'a' as isize,
    Host = b'h' as isize,
    Command = b'c' as isize,
    Job = b'j' as isize,
    Kind = b'k' as isize,
}

fn index_prefix(dim: Dim, value: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(value.len() + 2);
    k.push(dim as u8);
    k.extend(value.bytes().filter(|b| *b != 0));
    k.push(0);
    k
}

fn index_key(dim: Dim, value: &str, time_ms: u64, seq: u64) -> Vec<u8> {
    let mut k = index_prefix(dim, value);
    k.extend_from_slice(&time_ms.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
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

/// The index entries of a record. `all` adds the actor entry that
/// `actor_is_own_host` leaves out (earlier versions wrote it; retention
/// removes it too).
fn index_keys(r: &Record, all: bool) -> Vec<Vec<u8>> {
    let e = &r.event;
    let mut out = vec![index_key(Dim::Kind, e.kind.as_str(), r.time_ms, r.seq)];
    if all || !actor_is_own_host(e) {
        out.push(index_key(Dim::Actor, &e.actor, r.time_ms, r.seq));
    }
    if !e.command.is_empty() {
        out.push(index_key(Dim::Command, &e.command, r.time_ms, r.seq));
    }
    if !e.job_id.is_empty() {
        out.push(index_key(Dim::Job, &e.job_id, r.time_ms, r.seq));
    }
    for h in &e.hosts {
        out.push(index_key(Dim::Host, h, r.time_ms, r.seq));
    }
    out
}

fn decode_record(k: &[u8], v: &[u8]) -> Result<Record, StoreError> {
    codec::decode(v).map_err(|reason| StoreError::Corrupt {
        key: format!("audit/{}", seq_of(k)),
        reason,
    })
}

/// The `time seq` suffix of an index key (big-endian, so it orders them).
fn time_seq(k: &[u8]) -> [u8; 16] {
    let mut b = [0u8; 16];
    let n = k.len().min(16);
    b[16 - n..].copy_from_slice(&k[k.len() - n..]);
    b
}

fn seq_of(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = k.len().min(8);
    b[8 - n..].copy_from_slice(&k[k.len() - n..]);
    u64::from_be_bytes(b)
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
        let records = store.tree(RECORDS)?;
        let chain = match records.last()? {
            Some((k, v)) => Chain::after(&decode_record(&k, &v)?),
            None => Chain::genesis(),
        };
        let index = store.tree(INDEX)?;
        for kv in records.iter().rev().take(1000) {
            let (k, v) = kv?;
            let r = decode_record(&k, &v)?;
            for key in index_keys(&r, false) {
                index.insert(key, &[][..])?;
            }
        }
        let last_signed = store
            .tree(HEADS)?
            .last()?
            .map(|(k, _)| seq_of(&k))
            .unwrap_or(0);
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
        let records = self.store.tree(RECORDS)?;
        let index = self.store.tree(INDEX)?;
        // The chain lock covers the hash and the record's insert (records
        // reach the log in sequence order), not the index: a job submitted
        // to 10 000 hosts has 10 000 index entries, and every result being
        // recorded meanwhile would wait for them.
        let rec = {
            let mut chain = lock(&self.chain);
            let mut next = chain.clone();
            let rec = next.append(now_ms, event);
            records
                .insert(seq_key(rec.seq), codec::encode(&rec))
                .map_err(backend)?;
            *chain = next;
            rec
        };
        // Plain inserts, not a `sled::Batch`: sled 0.34 writes out and
        // syncs its current log buffer before and after every batch (and
        // takes a lock that stops every other tree operation meanwhile),
        // which cost two log writes per audit record. The index does not
        // need a batch's atomicity: it is made durable by the same flush
        // as its record, and `open` re-indexes the newest records after a
        // crash.
        for k in index_keys(&rec, false) {
            index.insert(k, &[][..]).map_err(backend)?;
        }
        Ok(rec.seq)
    }

    pub fn get(&self, seq: u64) -> Result<Option<Record>, StoreError> {
        let k = seq_key(seq);
        self.store
            .tree(RECORDS)?
            .get(k)
            .map_err(backend)?
            .map(|v| decode_record(&k, &v))
            .transpose()
    }

    /// Records with `seq >= from`, in order, at most `limit`.
    pub fn records_from(&self, from: u64, limit: usize) -> Result<Vec<Record>, StoreError> {
        self.store
            .tree(RECORDS)?
            .range(seq_key(from)..)
            .take(limit)
            .map(|kv| {
                let (k, v) = kv.map_err(backend)?;
                decode_record(&k, &v)
            })
            .collect()
    }

    /// Signed heads covering `seq >= from`.
    pub fn heads_from(&self, from: u64) -> Result<Vec<SignedHead>, StoreError> {
        self.store
            .tree(HEADS)?
            .range(seq_key(from)..)
            .map(|kv| {
                let (k, v) = kv.map_err(backend)?;
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                    key: format!("audit_heads/{}", seq_of(&k)),
                    reason: e.to_string(),
                })
            })
            .collect()
    }

    /// Signs the current head if records were added since the last one.
    /// Durable after the next flush.
    pub fn sign_head(&self) -> Result<Option<SignedHead>, StoreError> {
        let chain = lock(&self.chain).clone();
        let mut last = lock(&self.last_head);
        if chain.seq == 0 || chain.seq <= last.0 {
            return Ok(None);
        }
        let head = SignedHead::sign(&chain, now_ms(), &self.key);
        let json = serde_json::to_vec(&head).expect("signed heads serialize to JSON");
        self.store
            .tree(HEADS)?
            .insert(seq_key(head.seq), json)
            .map_err(backend)?;
        *last = (chain.seq, Instant::now());
        Ok(Some(head))
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
        let records = self.store.tree(RECORDS)?;
        let tip = lock(&self.chain).seq;
        let limit = max_seq.min(tip.saturating_sub(1));
        let mut last: Option<Record> = None;
        let mut n = 0u64;
        for kv in records.iter() {
            let (k, v) = kv.map_err(backend)?;
            let r = decode_record(&k, &v)?;
            if r.seq > limit || r.time_ms >= before_ms || n as usize >= batch {
                break;
            }
            last = Some(r);
            n += 1;
        }
        let Some(last) = last else { return Ok(0) };
        let heads = self.store.tree(HEADS)?;
        let checkpoint = SignedHead::sign(&Chain::after(&last), now_ms(), &self.key);
        let json = serde_json::to_vec(&checkpoint).expect("signed heads serialize to JSON");
        heads.insert(seq_key(last.seq), json).map_err(backend)?;
        self.store.flush()?;
        let index = self.store.tree(INDEX)?;
        for kv in records.range(..=seq_key(last.seq)) {
            let (k, v) = kv.map_err(backend)?;
            let r = decode_record(&k, &v)?;
            for key in index_keys(&r, true) {
                index.remove(key).map_err(backend)?;
            }
            records.remove(k).map_err(backend)?;
        }
        for kv in heads.range(..seq_key(last.seq)) {
            let (k, _) = kv.map_err(backend)?;
            heads.remove(k).map_err(backend)?;
        }
        self.store.flush()?;
        tracing::info!(
            removed = n,
            checkpoint_seq = last.seq,
            "audit retention: removed the oldest records"
        );
        Ok(n)
    }

    /// The first record still stored (after retention), if any.
    pub fn first_seq(&self) -> Result<Option<u64>, StoreError> {
        Ok(self
            .store
            .tree(RECORDS)?
            .first()
            .map_err(backend)?
            .map(|(k, _)| seq_of(&k)))
    }

    /// Periodic work (called every second by the controller's sweeper):
    /// signs the head every `HEAD_INTERVAL` when there is something new, and
    /// makes it durable.
    pub async fn tick(&self) -> Result<(), StoreError> {
        let due = lock(&self.last_head).1.elapsed() >= HEAD_INTERVAL;
        if due && self.sign_head()?.is_some() {
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
        let records = self.store.tree(RECORDS)?;
        let iter = records.range(seq_key(opts.from.unwrap_or(0))..).map(
            |kv| -> Result<Record, StoreError> {
                let (k, v) = kv.map_err(backend)?;
                decode_record(&k, &v)
            },
        );
        Ok(verify_chain(iter, &heads, Some(&self.public), &opts))
    }

    /// The first seq whose time is `>= t` (records are in time order).
    fn first_seq_at(&self, records: &sled::Tree, t: u64) -> Result<u64, StoreError> {
        let first = match records.first().map_err(backend)? {
            Some((k, _)) => seq_of(&k),
            None => return Ok(1),
        };
        let (mut lo, mut hi) = (first, lock(&self.chain).seq + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let time = match records.get(seq_key(mid)).map_err(backend)? {
                Some(v) => decode_record(&seq_key(mid), &v)?.time_ms,
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
        let records = self.store.tree(RECORDS)?;
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
            let index = self.store.tree(INDEX)?;
            // An agent's own results are indexed under its host only
            // (`actor_is_own_host`): a search by `agent:NAME` reads both.
            let mut prefixes = vec![index_prefix(dim, &value)];
            if let (Dim::Actor, Some(host)) = (dim, value.strip_prefix("agent:")) {
                prefixes.push(index_prefix(Dim::Host, host));
            }
            let ranges = prefixes.into_iter().map(|prefix| {
                let mut lo = prefix.clone();
                lo.extend_from_slice(&f.since_ms.unwrap_or(0).to_be_bytes());
                let mut hi = prefix;
                match (before_seq, before_time) {
                    (Some(s), Some(t)) if f.until_ms.is_none_or(|u| t < u) => {
                        hi.extend_from_slice(&t.to_be_bytes());
                        hi.extend_from_slice(&s.to_be_bytes());
                    }
                    _ => {
                        hi.extend_from_slice(&f.until_ms.unwrap_or(u64::MAX).to_be_bytes());
                        hi.extend_from_slice(&[0u8; 8]);
                    }
                }
                index.range(lo..hi).keys().rev().peekable()
            });
            let mut ranges: Vec<_> = ranges.collect();
            let mut previous: Option<u64> = None;
            loop {
                // Newest first across the ranges: by the (time, seq) suffix.
                let mut best: Option<(usize, [u8; 16])> = None;
                for (i, r) in ranges.iter_mut().enumerate() {
                    let suffix = match r.peek() {
                        None => continue,
                        Some(Err(_)) => [u8::MAX; 16],
                        Some(Ok(k)) => time_seq(k),
                    };
                    if best.is_none_or(|(_, b)| suffix > b) {
                        best = Some((i, suffix));
                    }
                }
                let Some((i, _)) = best else { break };
                let Some(k) = ranges[i].next() else { break };
                let k = k.map_err(backend)?;
                let seq = seq_of(&k);
                if previous == Some(seq) {
                    continue; // indexed under both (written by earlier versions)
                }
                previous = Some(seq);
                if before_seq.is_some_and(|b| seq >= b) {
                    continue;
                }
                let Some(v) = records.get(seq_key(seq)).map_err(backend)? else {
                    continue;
                };
                let r = decode_record(&seq_key(seq), &v)?;
                if push(r, &mut out) {
                    stopped_early = true;
                    break;
                }
            }
        } else {
            let lo = match f.since_ms {
                Some(t) => self.first_seq_at(&records, t)?,
                None => 0,
            };
            let mut hi = match f.until_ms {
                Some(t) => self.first_seq_at(&records, t)?,
                None => u64::MAX,
            };
            if let Some(b) = before_seq {
                hi = hi.min(b);
            }
            if lo < hi {
                for kv in records.range(seq_key(lo)..seq_key(hi)).rev() {
                    let (k, v) = kv.map_err(backend)?;
                    if push(decode_record(&k, &v)?, &mut out) {
                        stopped_early = true;
                        break;
                    }
                }
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
