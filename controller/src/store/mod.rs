//! Durable state of the controller behind one `Store` trait made of typed
//! parts: jobs with their targets and short ids ([`JobStore`]), join
//! tokens ([`TokenStore`]), enrolled agents ([`AgentStore`]), the policy
//! bundle ([`PolicyStore`]), the audit log ([`AuditStore`]), alerting state
//! ([`HealthStore`]), certificate revocations ([`RevocationStore`]) and
//! the leases under which one controller runs each singleton
//! ([`LeaseStore`]) and the claims that let several gateways on one chat
//! act once ([`ClaimStore`]).
//! sled is the embedded default (`sled_store`), redb the other embedded
//! choice (`redb_store`; the two share their byte `layout` and their
//! in-memory `local_leases`); every backend passes the same `conformance`
//! suite.
//!
//! Architecture invariant: no part hands out a backend's handle (a tree, a
//! connection); queries (jobs by requester and state, newest first; ids by
//! prefix; audit index ranges) are answered by the backend, so a network
//! database filters where the data is.
//!
//! Every method is synchronous and may block (a disk flush, a network
//! round trip): async code calls the store through `spawn_blocking`.
//! Writes are visible at once and durable after `flush`; callers flush
//! before they acknowledge anything (a result, a join, a policy push).

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod embedded;
mod layout;
mod local_leases;
pub mod postgres;
mod records;
mod redb_store;
mod reopening;
mod sled_store;

use fleetcmd_core::audit::{Record, SignedHead};
use fleetcmd_core::state::JobState;

pub use embedded::Embedded;
pub use records::{
    AgentRecord, HealthRecord, HealthTransition, JobRecord, PolicyRecord, TargetRecord,
    TokenRecord, TokenRefusal,
};
pub use redb_store::{REDB_FILE, RedbStore};
pub use sled_store::{DEFAULT_CACHE_BYTES, SLED_DIR, SledStore};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "database at {path}: {reason}; restore the directory from a backup or move it aside to start empty"
    )]
    Open { path: String, reason: String },
    #[error("database {target}: {reason}")]
    Connect { target: String, reason: String },
    #[error("database: {0}")]
    Backend(String),
    #[error("database record {key}: {reason}")]
    Corrupt { key: String, reason: String },
    /// A write that would break a promise of the store (an audit record
    /// out of sequence); nothing was written.
    #[error("database refused {what}: {reason}")]
    Conflict { what: String, reason: String },
}

/// One target's new record, for `Store::put_targets_audited`.
#[derive(Debug, Clone, Copy)]
pub struct TargetWrite<'a> {
    pub job: &'a str,
    pub agent: &'a str,
    pub rec: &'a TargetRecord,
}

/// Refuses writes that name one (job, target) twice: which of them would
/// win is not defined (one PostgreSQL statement may not change a row twice).
fn check_distinct(writes: &[TargetWrite<'_>]) -> Result<(), StoreError> {
    let mut seen = std::collections::HashSet::new();
    match writes.iter().find(|w| !seen.insert((w.job, w.agent))) {
        Some(w) => Err(StoreError::Backend(format!(
            "target {} of job {} written twice in one step",
            w.agent, w.job
        ))),
        None => Ok(()),
    }
}

/// The controller's storage: every part, plus durability. `Any`, so a
/// test or tool that knows the backend can reach it (`SledStore::raw_tree`).
pub trait Store:
    JobStore
    + TokenStore
    + AgentStore
    + PolicyStore
    + AuditStore
    + HealthStore
    + RevocationStore
    + LeaseStore
    + ClaimStore
    + PresenceStore
    + Send
    + Sync
    + std::any::Any
{
    /// Blocks until everything written so far is durable.
    fn flush(&self) -> Result<(), StoreError>;
    /// Targets and the audit records of them, one atomic step: every write
    /// is applied where the target's stored state is still `from` (as
    /// `put_targets_if`) and the records — each with its index entries,
    /// in sequence — where the first is next in the chain (as
    /// `audit_append`); all or nothing. `Ok(Err(lost))`: the writes at
    /// the indexes `lost` found another state; `Conflict`: the first
    /// record is not next; nothing was written either way. A write names
    /// each (job, target) at most once. With several controllers on one
    /// store, separate writes would let a controller killed between them
    /// leave a claimed target without its `job_dispatched` record, or a
    /// stored result without its `job_finished` one (the agent's copy,
    /// sent again to another controller, is then ignored as already
    /// stored); and one call stores a batch of results in one
    /// transaction. This default checks everything, then writes one after
    /// the other: for a store with one writer, whose flush makes all of it
    /// durable before any is acknowledged.
    fn put_targets_audited(
        &self,
        from: fleetcmd_core::state::TargetState,
        writes: &[TargetWrite<'_>],
        audit: &[(Record, Vec<AuditIndexEntry>)],
    ) -> Result<Result<(), Vec<usize>>, StoreError> {
        check_distinct(writes)?;
        if let (Some(last), Some((first, _))) = (self.audit_last()?, audit.first())
            && last.seq.checked_add(1) != Some(first.seq)
        {
            return Err(StoreError::Conflict {
                what: format!("audit record {}", first.seq),
                reason: format!("the log ends at {}", last.seq),
            });
        }
        let mut lost = Vec::new();
        for (i, w) in writes.iter().enumerate() {
            let state = self
                .get_target(w.job, w.agent)?
                .map_or(fleetcmd_core::state::TargetState::Pending, |t| t.state);
            if state != from {
                lost.push(i);
            }
        }
        if !lost.is_empty() {
            return Ok(Err(lost));
        }
        for w in writes {
            if self
                .put_targets_if(w.job, from, &[(w.agent, w.rec)])?
                .is_empty()
            {
                // One writer: only a bug gets here. Say so rather than
                // append a record of a target that was not written.
                return Err(StoreError::Backend(format!(
                    "target {} of job {} changed while it was written",
                    w.agent, w.job
                )));
            }
        }
        for (rec, index) in audit {
            self.audit_append(rec, index)?;
        }
        Ok(Ok(()))
    }
    /// `put_targets_audited` with the records made from `events` (at
    /// `now_ms`) after the stored tip, whatever it is, under the store's
    /// append lock: they are made once the tip can no longer move, so this
    /// cannot lose a race to another writer. What a writer that lost one
    /// does (as `audit_append_at_tip`; a writer that only reread the tip
    /// and tried again could lose to a busy one every time). Returns the
    /// chain after the last record stored. This default reads, makes and
    /// writes: for a store with one writer.
    fn put_targets_audited_at_tip(
        &self,
        from: fleetcmd_core::state::TargetState,
        writes: &[TargetWrite<'_>],
        now_ms: u64,
        events: &[fleetcmd_core::audit::Event],
    ) -> Result<Result<fleetcmd_core::audit::Chain, Vec<usize>>, StoreError> {
        let mut chain = match self.audit_last()? {
            Some(last) => fleetcmd_core::audit::Chain::after(&last),
            None => fleetcmd_core::audit::Chain::genesis(),
        };
        let audit = crate::audit::make_records(&mut chain, now_ms, events);
        Ok(self
            .put_targets_audited(from, writes, &audit)?
            .map(|()| chain))
    }
    /// Whether agents' results should be stored in batches
    /// (`put_targets_audited`, one call per batch) even with one controller:
    /// where each call costs a transaction, so one per batch is cheaper
    /// than a target write and an audit append per result. `false` (the
    /// default): one controller writes each result itself.
    fn batches_results(&self) -> bool {
        false
    }
    /// Releases the database (its files, locks or connections); later
    /// calls fail.
    fn close(&self);
}

/// Why a new job was not stored (nothing was written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobClash {
    /// A job with this id exists (a replayed submission).
    IdExists,
    /// The short id names another job, `holder`.
    ShortIdTaken { holder: String },
}

/// Which end of the job order a listing starts from (jobs are ordered by
/// id: UUIDv7, so by creation time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    #[default]
    NewestFirst,
    OldestFirst,
}

/// A job listing, answered by the backend (filters are ANDed).
#[derive(Debug, Clone, Default)]
pub struct JobQuery {
    pub requester: Option<String>,
    pub state: Option<JobState>,
    /// `Some(true)`: only finished jobs (a terminal state); `Some(false)`:
    /// only unfinished ones.
    pub finished: Option<bool>,
    /// Only jobs created before this time (retention's age cut).
    pub created_before_ms: Option<u64>,
    /// Continue after this job id (the last of the previous page).
    pub after: Option<String>,
    pub order: Order,
    pub limit: usize,
}

impl JobQuery {
    /// The newest `limit` jobs.
    pub fn newest(limit: usize) -> JobQuery {
        JobQuery {
            limit,
            ..JobQuery::default()
        }
    }

    /// The answer from a scan of jobs in this query's order and after its
    /// cursor (a backend without secondary indexes: the embedded ones):
    /// the jobs that pass the filters, up to the limit; oldest first, the
    /// scan stops at the first job created at or after
    /// `created_before_ms` (ids order jobs by creation).
    pub fn take_from(
        &self,
        scan: impl Iterator<Item = Result<JobRecord, StoreError>>,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let mut out = Vec::new();
        if self.limit == 0 {
            return Ok(out);
        }
        for rec in scan {
            let rec = rec?;
            if self.order == Order::OldestFirst
                && self
                    .created_before_ms
                    .is_some_and(|t| rec.created_at_ms >= t)
            {
                break;
            }
            if self.matches(&rec) {
                out.push(rec);
                if out.len() >= self.limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Whether `rec` passes the filters (not the cursor or the limit);
    /// backends that cannot filter in their query language use this.
    pub fn matches(&self, rec: &JobRecord) -> bool {
        self.requester.as_ref().is_none_or(|r| rec.requester == *r)
            && self.state.is_none_or(|s| rec.state == s)
            && self.finished.is_none_or(|f| rec.state.is_terminal() == f)
            && self.created_before_ms.is_none_or(|t| rec.created_at_ms < t)
    }
}

/// Jobs, their targets (one record per job and agent, holding the target's
/// state and its result together, so a result and its state are one
/// write) and short ids.
pub trait JobStore {
    /// Stores a new job, claims its short id `short` and writes its
    /// initial `targets`, in one transaction: all of it or nothing. Of two
    /// concurrent creations with one id or one short id exactly one
    /// succeeds.
    fn create_job(
        &self,
        short: &str,
        rec: &JobRecord,
        targets: &[(&str, &TargetRecord)],
    ) -> Result<Result<(), JobClash>, StoreError>;
    /// Updates a job (its state, why it stopped); also stores one that
    /// was not created (the test hook that injects unchecked jobs).
    fn put_job(&self, rec: &JobRecord) -> Result<(), StoreError>;
    fn get_job(&self, id: &str) -> Result<Option<JobRecord>, StoreError>;
    /// The full id of the job whose short id is `short`.
    fn job_id_by_short(&self, short: &str) -> Result<Option<String>, StoreError>;
    /// Ids starting with `prefix`, in id order, at most `limit`.
    fn job_ids_with_prefix(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError>;
    /// Jobs matching `q`, in its order, at most `q.limit`.
    fn list_jobs(&self, q: &JobQuery) -> Result<Vec<JobRecord>, StoreError>;
    /// Deletes a job, its targets' records and its short id (when it still
    /// names this job), in one transaction; returns the bytes freed (as
    /// `job_bytes` counts them), 0 for an unknown job.
    fn delete_job(&self, id: &str) -> Result<u64, StoreError>;
    /// Bytes the job and target records take (retention's size limit).
    fn job_bytes(&self) -> Result<u64, StoreError>;
    /// Writes one target's record (its state, with its result once it
    /// arrived): one atomic write.
    fn put_target(&self, job: &str, agent: &str, rec: &TargetRecord) -> Result<(), StoreError>;
    /// Writes many targets of one job (a dispatch chunk). Not atomic: a
    /// crash may keep some of them; a target without a record is pending
    /// and is dispatched again, which agents answer from their own record
    /// of the job id (at most once per agent).
    fn put_targets(&self, job: &str, recs: &[(&str, &TargetRecord)]) -> Result<(), StoreError>;
    /// Writes each of `recs` only where the target's stored state is
    /// still `from` (`Pending`: no record, or a pending one), each check
    /// and write one atomic step; returns the agents whose record was
    /// written. The claim that makes dispatch exactly-once among
    /// controllers sharing the store: of two controllers claiming one
    /// pending target, one gets it, and a result never overwrites one that
    /// another controller stored first.
    fn put_targets_if(
        &self,
        job: &str,
        from: fleetcmd_core::state::TargetState,
        recs: &[(&str, &TargetRecord)],
    ) -> Result<Vec<String>, StoreError>;
    fn get_target(&self, job: &str, agent: &str) -> Result<Option<TargetRecord>, StoreError>;
    /// A job's target records, by agent name.
    fn targets(&self, job: &str) -> Result<Vec<(String, TargetRecord)>, StoreError>;
}

pub trait TokenStore {
    fn put_token(&self, id: &str, rec: &TokenRecord) -> Result<(), StoreError>;
    /// Atomically checks the secret and consumes one use: of two concurrent
    /// callers with a single-use token exactly one succeeds.
    fn consume_token(
        &self,
        id: &str,
        secret_hash: &str,
        now: u64,
    ) -> Result<Result<TokenRecord, TokenRefusal>, StoreError>;
}

/// Enrolled agents; a revocation is a `put_agent` with `revoked` set.
pub trait AgentStore {
    fn put_agent(&self, rec: &AgentRecord) -> Result<(), StoreError>;
    fn get_agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError>;
    /// Every agent, by id.
    fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError>;
    /// The enrolled agents among `ids` (unknown ids are left out), in one
    /// read where the backend can (what a batch of results checks for
    /// revocations).
    fn get_agents(&self, ids: &[&str]) -> Result<Vec<AgentRecord>, StoreError> {
        ids.iter()
            .filter_map(|id| self.get_agent(id).transpose())
            .collect()
    }
}

/// The one current policy bundle.
pub trait PolicyStore {
    /// Stores `rec` where the stored policy is older (or there is none),
    /// one atomic step; `false`: the stored version is `rec`'s or newer
    /// and nothing was written. Of two controllers pushing one version at
    /// once, one wins (found by an outside test: both were accepted and
    /// the fleet stayed split between two bundles of one version).
    fn put_policy(&self, rec: &PolicyRecord) -> Result<bool, StoreError>;
    fn get_policy(&self) -> Result<Option<PolicyRecord>, StoreError>;
}

/// A dimension of the audit index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditDim {
    Actor,
    Host,
    Command,
    Job,
    Kind,
}

/// One audit index entry: record `seq` (at `time_ms`) has `value` in `dim`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AuditIndexEntry {
    pub dim: AuditDim,
    pub value: String,
    pub time_ms: u64,
    pub seq: u64,
}

/// The audit log: hash-chained records by sequence number, their search
/// index, and signed chain heads. Records are never rewritten, only
/// removed from the old end (retention).
pub trait AuditStore {
    /// Appends `rec` with its index entries. `rec.seq` must be one past
    /// the newest stored record (any seq on an empty log), else
    /// `StoreError::Conflict` and nothing is written: the stored sequence
    /// numbers are contiguous and one chain.
    fn audit_append(&self, rec: &Record, index: &[AuditIndexEntry]) -> Result<(), StoreError>;
    /// Appends `event` after the stored tip, whatever it is, as one step
    /// under the store's append lock: the record (`Chain::after` the tip,
    /// at `now_ms`) is made once the tip can no longer move, so it cannot
    /// lose a race. What a writer that lost one to another writer does
    /// (found in CI: with two controllers appending at once, one lost 64
    /// races in a row — the other never rereads its tip — and failed a
    /// request). Returns the stored record. This default reads, makes and
    /// appends: for a store with one writer.
    fn audit_append_at_tip(
        &self,
        now_ms: u64,
        event: fleetcmd_core::audit::Event,
    ) -> Result<Record, StoreError> {
        let mut chain = match self.audit_last()? {
            Some(last) => fleetcmd_core::audit::Chain::after(&last),
            None => fleetcmd_core::audit::Chain::genesis(),
        };
        let rec = chain.append(now_ms, event);
        self.audit_append(&rec, &crate::audit::index_entries(&rec, false))?;
        Ok(rec)
    }
    /// Writes index entries again (idempotent): after a crash an entry may
    /// have missed the flush that made its record durable.
    fn audit_put_index(&self, index: &[AuditIndexEntry]) -> Result<(), StoreError>;
    /// Whether a record's index entries may be written after it
    /// (`audit_put_index`), once the appender has let go of the chain:
    /// where a record and its entries become durable by the same flush
    /// anyway, and a crash between the two leaves at most the newest
    /// records unindexed, which `Audit::open` indexes again (one process
    /// writes the store). A job to 10 000 hosts has 10 000 entries, and
    /// every other append would wait for them. `false` (the default):
    /// the entries go with the record, in `audit_append`.
    fn audit_index_after_append(&self) -> bool {
        false
    }
    /// The newest record: the chain's tip.
    fn audit_last(&self) -> Result<Option<Record>, StoreError>;
    /// The oldest record still stored (after retention).
    fn audit_first_seq(&self) -> Result<Option<u64>, StoreError>;
    fn audit_get(&self, seq: u64) -> Result<Option<Record>, StoreError>;
    /// Records with `from <= seq < to`, in `order`, at most `limit`.
    fn audit_records(
        &self,
        from: u64,
        to: u64,
        order: Order,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError>;
    /// `(time_ms, seq)` of the entries of `dim` = `value` with
    /// `since_ms <= time_ms` and `(time_ms, seq) < before`, newest first,
    /// at most `limit`.
    fn audit_index_page(
        &self,
        dim: AuditDim,
        value: &str,
        since_ms: u64,
        before: (u64, u64),
        limit: usize,
    ) -> Result<Vec<(u64, u64)>, StoreError>;
    /// Removes the records with `seq <= through` and the given index
    /// entries (theirs).
    fn audit_remove_through(
        &self,
        through: u64,
        index: &[AuditIndexEntry],
    ) -> Result<(), StoreError>;
    fn audit_put_head(&self, head: &SignedHead) -> Result<(), StoreError>;
    /// Signed heads with `seq >= from`, in order.
    fn audit_heads_from(&self, from: u64) -> Result<Vec<SignedHead>, StoreError>;
    /// The newest signed head's seq.
    fn audit_last_head_seq(&self) -> Result<Option<u64>, StoreError>;
    /// Removes the signed heads with `seq < before`.
    fn audit_remove_heads_before(&self, before: u64) -> Result<(), StoreError>;
}

/// What was announced per service or `HOST/CHECK`, and each one's recent
/// transitions.
pub trait HealthStore {
    fn health_state(&self, name: &str) -> Result<Option<HealthRecord>, StoreError>;
    fn put_health_state(&self, name: &str, rec: &HealthRecord) -> Result<(), StoreError>;
    /// Adds a transition and keeps only the newest `keep` of `name`'s.
    fn add_health_transition(
        &self,
        name: &str,
        t: &HealthTransition,
        keep: usize,
    ) -> Result<(), StoreError>;
    /// `name`'s transitions, newest first, at most `limit`.
    fn health_transitions(
        &self,
        name: &str,
        limit: usize,
    ) -> Result<Vec<HealthTransition>, StoreError>;
}

/// Revocations of operator and gateway certificates.
pub trait RevocationStore {
    fn put_revocation(&self, rec: &crate::revocation::CertRevocation) -> Result<(), StoreError>;
    fn revocations(&self) -> Result<Vec<crate::revocation::CertRevocation>, StoreError>;
}

/// A lease as the store granted it: who holds it, and its fencing term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub holder: String,
    /// Grows by one each time the lease passes to a holder (a new holder,
    /// or the same one after its lease expired): a write guarded by an
    /// older term is refused.
    pub term: u64,
}

/// What a write guarded by a lease names: the lease, its holder and the
/// term that holder was granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub lease: String,
    pub holder: String,
    pub term: u64,
}

/// Named leases with fencing terms, so that among controllers sharing one
/// database exactly one runs each singleton. Expiry is decided by the
/// database's clock (PostgreSQL's `now()`), never by the callers' clocks.
pub trait LeaseStore {
    /// Takes `name` for `holder` for `ttl` if it is free, expired or held
    /// by `holder` already (then it is extended with the same term); a new
    /// grant gets the previous term plus one (1 for a new name). `None`:
    /// another holder's lease is still running, nothing was written.
    fn lease_acquire(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<Lease>, StoreError>;
    /// Extends `holder`'s lease at `term` by `ttl` from now; `false` when
    /// it is not held at that term any more (expired, or taken over), and
    /// nothing was written.
    fn lease_renew(
        &self,
        name: &str,
        holder: &str,
        term: u64,
        ttl: std::time::Duration,
    ) -> Result<bool, StoreError>;
    /// Ends `holder`'s lease at `term` now (a clean shutdown), so another
    /// holder takes over without waiting for the expiry; `false` when it
    /// was not held at that term.
    fn lease_release(&self, name: &str, holder: &str, term: u64) -> Result<bool, StoreError>;
    /// The unexpired lease on `name`, if any.
    fn lease_holder(&self, name: &str) -> Result<Option<Lease>, StoreError>;
    /// Removes the leases named `prefix…` that ended more than
    /// `ended_for` ago, term and all (an embedded store: those this open
    /// has not granted within `ended_for`), so the next grant of such a
    /// name starts at term 1; returns how many. Only for leases whose
    /// holder names are unique per process (gateway chat leases,
    /// `CERTNAME:HOLDER` with a random holder) and whose terms fence no
    /// stored write: an old holder can then neither renew nor release the
    /// new grant, whatever its term. What keeps the rows a gateway
    /// certificate can make by naming leases from growing forever.
    fn prune_leases(&self, prefix: &str, ended_for: std::time::Duration)
    -> Result<u64, StoreError>;
    /// Stores a signed audit head only while `fence` is the current,
    /// unexpired grant of its lease, checked in the same statement as the
    /// write; `false`: refused (a stale leader), nothing was written.
    fn audit_put_head_fenced(&self, fence: &Fence, head: &SignedHead) -> Result<bool, StoreError>;
    /// Stores audit exporter `name`'s cursor (the last record and head
    /// sequence numbers its sink acknowledged) only while `fence` is the
    /// current, unexpired grant of its lease, as `audit_put_head_fenced`:
    /// with several controllers the holder of `audit-export:NAME` runs the
    /// export and the next holder resumes from here. `false`: refused.
    fn put_export_cursor_fenced(
        &self,
        fence: &Fence,
        name: &str,
        cursor: ExportCursor,
    ) -> Result<bool, StoreError>;
    /// Exporter `name`'s stored cursor, if any.
    fn export_cursor(&self, name: &str) -> Result<Option<ExportCursor>, StoreError>;
}

/// Where an audit exporter stands: the last record and signed-head
/// sequence numbers its sink acknowledged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportCursor {
    pub records: u64,
    pub heads: u64,
}

/// One controller's entry in the presence table: the agents connected to
/// it when it wrote, and whether it was still settling then (agents
/// reconnecting after it started: its list is not yet whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub controller: String,
    pub settling: bool,
    pub agents: Vec<String>,
}

/// Which agents are connected to which controller, with several
/// controllers on one store: each controller writes its whole list every
/// few seconds, so a controller can tell an agent connected to another
/// from one connected to none. Freshness is decided by the backend's clock
/// (PostgreSQL's `now()`), as for leases.
pub trait PresenceStore {
    /// Replaces `controller`'s entry (stamped now); entries not written for
    /// a day are removed.
    fn put_presence(&self, entry: &Presence) -> Result<(), StoreError>;
    /// Stamps `controller`'s entry now, with `settling`, keeping its
    /// agents (what a controller writes when its list did not change);
    /// `false` when it has no entry (nothing was written).
    fn touch_presence(&self, controller: &str, settling: bool) -> Result<bool, StoreError>;
    /// The entries written within `fresh`, by controller.
    fn presence(&self, fresh: std::time::Duration) -> Result<Vec<Presence>, StoreError>;
    /// Replaces these agents' live rows (stamped now), each with the
    /// controller that wrote it.
    fn put_agents_live(&self, rows: &[AgentLive]) -> Result<(), StoreError>;
    /// The live rows written within `since` (every row with `None`).
    fn agents_live(&self, since: Option<std::time::Duration>)
    -> Result<Vec<AgentLive>, StoreError>;
}

/// What the controller an agent is connected to knows of it — the figures,
/// check results and versions of its heartbeats, as an encoded
/// `pb::Agent` without labels — for the other controllers' agent lists and
/// health evaluation. Written when it changes (and now and then), one row
/// per agent, by the controller it is connected to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentLive {
    pub agent: String,
    pub controller: String,
    pub data: Vec<u8>,
}

/// Keys claimed until an expiry, first come first served: how several
/// gateways on one chat (each talking to any controller of one database)
/// agree which of them acts on a chat event, an alert or an audit record.
/// Keys are [`crate::claims::ClaimKey`]s (bounded, printable). Expiry is
/// decided by the backend's clock (PostgreSQL's `now()`), as for leases.
pub trait ClaimStore {
    /// Claims `key` for `ttl` when no unexpired claim holds it (never
    /// claimed, or its claim expired); `true`: this call made the claim.
    /// Of concurrent claims of one key exactly one wins.
    fn claim(
        &self,
        key: &crate::claims::ClaimKey,
        ttl: std::time::Duration,
    ) -> Result<bool, StoreError>;
    /// Removes the expired claims (the retention singleton); returns how
    /// many.
    fn prune_claims(&self) -> Result<u64, StoreError>;
}
