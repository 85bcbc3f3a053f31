//! Durable state of the controller behind one `Store` trait; sled is the
//! embedded default. Keys are ordered for range scans: jobs by id
//! (UUIDv7, so by time), targets by `job/agent`; `job_short` maps each
//! job's short id (the last 12 hex digits) to its full id.
//!
//! Writes are visible at once and durable after `flush`; callers flush before
//! they acknowledge anything (a result, a join, a policy push).

#[cfg(test)]
pub mod conformance;
pub mod postgres;

use std::collections::BTreeMap;
use std::path::Path;

use fleetcmd_core::state::{JobState, Stop, TargetState, UnknownState};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

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
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

/// Byte fields are stored as base64 text, not JSON arrays of numbers (which
/// would take two to four bytes per byte of command output).
mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }

    pub mod opt {
        use super::*;

        pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(b) => super::serialize(b, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|t| {
                    base64::engine::general_purpose::STANDARD
                        .decode(t)
                        .map_err(serde::de::Error::custom)
                })
                .transpose()
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenRecord {
    /// Hex SHA-256 of the token secret; the secret itself is never stored.
    pub secret_hash: String,
    pub expires_at: u64,
    pub uses_left: u32,
    pub labels: BTreeMap<String, String>,
    pub name: Option<String>,
    pub created_by: String,
    /// For a token naming an agent that was enrolled when the token was
    /// created: that enrolment's `joined_at`. The token re-enrols exactly
    /// that enrolment (the one its creator's rights were checked against);
    /// `None`: the name was free, and the token takes no enrolled name.
    #[serde(default)]
    pub replaces: Option<u64>,
}

/// Why a token could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("unknown join token")]
    Unknown,
    #[error("join token expired")]
    Expired,
    #[error("join token already used")]
    Used,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentRecord {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub revoked: bool,
    pub joined_at: u64,
    #[serde(default)]
    pub version: String,
    /// The certificate of the last enrolment (`None` in records written
    /// before it was kept): earlier certificates for the name are refused.
    #[serde(default)]
    pub enrolment_cert: Option<crate::pki::EnrolmentCert>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobRecord {
    pub id: String,
    #[serde(with = "b64")]
    pub spec: Vec<u8>,
    #[serde(with = "b64")]
    pub signature: Vec<u8>,
    pub key_id: String,
    pub command: String,
    pub args: BTreeMap<String, String>,
    pub selector: String,
    pub requester: String,
    pub channel: String,
    pub created_at_ms: u64,
    /// Unix seconds after which unfinished targets are failed.
    pub deadline: u64,
    pub state: JobState,
    pub targets: Vec<String>,
    /// Rollout the requester signed (batch, error budget, canaries).
    #[serde(default)]
    pub rollout: fleetcmd_core::job::Rollout,
    #[serde(default)]
    pub needs_approval: bool,
    /// Seconds a dispatched target may take before it is failed (the
    /// command's timeout, or the job's if shorter, plus a grace).
    #[serde(default)]
    pub target_deadline_secs: u64,
    /// The spec's `expires_at`: pending targets cannot start after it.
    #[serde(default)]
    pub expires_at: u64,
    /// Set when the job was aborted, canceled or expired, with the reason.
    #[serde(default)]
    pub stopped: Option<(Stop, String)>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TargetRecord {
    pub state: TargetState,
    /// The agent's `JobResult`, protobuf-encoded, once it arrived.
    #[serde(with = "b64::opt", default)]
    pub result: Option<Vec<u8>>,
    pub reason: String,
    /// Unix seconds when it was dispatched (0 = not yet).
    #[serde(default)]
    pub dispatched_at: u64,
}

impl TargetRecord {
    pub fn new(state: TargetState, reason: &str) -> TargetRecord {
        TargetRecord {
            state,
            result: None,
            reason: reason.into(),
            dispatched_at: 0,
        }
    }
}

#[cfg(test)]
impl JobRecord {
    /// A job record for tests: `uptime` on `targets` by cli:alice, a 1 KB
    /// spec, no deadlines.
    pub(crate) fn for_test(
        id: &str,
        created_at_ms: u64,
        state: JobState,
        targets: &[&str],
    ) -> Self {
        JobRecord {
            id: id.into(),
            spec: vec![b'x'; 1000],
            signature: Vec::new(),
            key_id: "k".into(),
            command: "uptime".into(),
            args: BTreeMap::new(),
            selector: "all".into(),
            requester: "cli:alice".into(),
            channel: "cli:alice".into(),
            created_at_ms,
            deadline: 0,
            state,
            targets: targets.iter().map(|t| t.to_string()).collect(),
            rollout: Default::default(),
            needs_approval: false,
            target_deadline_secs: 0,
            expires_at: 0,
            stopped: None,
        }
    }
}

/// Target records are the most written records (one or two per target of
/// every job), so they are stored compactly: a format byte, then protobuf
/// (the result inside is protobuf already, no base64). Records written as
/// JSON by earlier versions (first byte `{`) are still read.
const TARGET_V2: u8 = 2;

#[derive(Clone, PartialEq, prost::Message)]
struct TargetWire {
    #[prost(string, tag = "1")]
    state: String,
    #[prost(bytes = "vec", optional, tag = "2")]
    result: Option<Vec<u8>>,
    #[prost(string, tag = "3")]
    reason: String,
    #[prost(uint64, tag = "4")]
    dispatched_at: u64,
}

fn encode_target(rec: &TargetRecord) -> Vec<u8> {
    use prost::Message;
    let wire = TargetWire {
        state: rec.state.as_str().to_owned(),
        result: rec.result.clone(),
        reason: rec.reason.clone(),
        dispatched_at: rec.dispatched_at,
    };
    let mut out = Vec::with_capacity(1 + wire.encoded_len());
    out.push(TARGET_V2);
    wire.encode(&mut out)
        .expect("a Vec grows to fit any protobuf message");
    out
}

fn decode_target(key: &[u8], bytes: &[u8]) -> Result<TargetRecord, StoreError> {
    use prost::Message;
    match bytes.split_first() {
        Some((&TARGET_V2, rest)) => {
            let w = TargetWire::decode(rest).map_err(|e| StoreError::Corrupt {
                key: String::from_utf8_lossy(key).into_owned(),
                reason: e.to_string(),
            })?;
            let state = w
                .state
                .parse()
                .map_err(|e: UnknownState| StoreError::Corrupt {
                    key: String::from_utf8_lossy(key).into_owned(),
                    reason: e.to_string(),
                })?;
            Ok(TargetRecord {
                state,
                result: w.result,
                reason: w.reason,
                dispatched_at: w.dispatched_at,
            })
        }
        // Written by a version before the compact format.
        _ => decode(key, bytes),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PolicyRecord {
    pub version: u64,
    pub bundle: Vec<u8>,
    /// (key id, signature) pairs.
    pub signatures: Vec<(String, Vec<u8>)>,
}

/// The controller's storage. Every method is quick except `flush`, which
/// blocks until everything written so far is on disk: call it through
/// `spawn_blocking`.
pub trait Store: Send + Sync + 'static {
    fn put_token(&self, id: &str, rec: &TokenRecord) -> Result<(), StoreError>;
    /// Atomically checks the secret and consumes one use: of two concurrent
    /// callers with a single-use token exactly one succeeds.
    fn consume_token(
        &self,
        id: &str,
        secret_hash: &str,
        now: u64,
    ) -> Result<Result<TokenRecord, TokenRefusal>, StoreError>;
    fn put_agent(&self, rec: &AgentRecord) -> Result<(), StoreError>;
    fn get_agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError>;
    fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError>;
    fn put_job(&self, rec: &JobRecord) -> Result<(), StoreError>;
    fn get_job(&self, id: &str) -> Result<Option<JobRecord>, StoreError>;
    /// Records that `short` names job `id`, unless it already names another
    /// job: then that job's id, and nothing is written. Atomic: of two
    /// concurrent claims of one short id exactly one succeeds.
    fn claim_short_id(&self, short: &str, id: &str) -> Result<Option<String>, StoreError>;
    /// The full id of the job whose short id is `short` (an index lookup).
    fn job_id_by_short(&self, short: &str) -> Result<Option<String>, StoreError>;
    /// Ids starting with `prefix`, at most `limit`.
    fn job_ids_with_prefix(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError>;
    /// Newest first.
    fn list_jobs(&self, limit: usize) -> Result<Vec<JobRecord>, StoreError>;
    fn put_target(&self, job: &str, agent: &str, rec: &TargetRecord) -> Result<(), StoreError>;
    /// Writes many targets of one job (a dispatch chunk). Not atomic: a
    /// crash may keep some of them; a target without a record is pending
    /// and is dispatched again, which agents answer from their own record
    /// of the job id (at most once per agent).
    fn put_targets(&self, job: &str, recs: &[(&str, &TargetRecord)]) -> Result<(), StoreError>;
    fn get_target(&self, job: &str, agent: &str) -> Result<Option<TargetRecord>, StoreError>;
    fn targets(&self, job: &str) -> Result<Vec<(String, TargetRecord)>, StoreError>;
    fn put_policy(&self, rec: &PolicyRecord) -> Result<(), StoreError>;
    fn get_policy(&self) -> Result<Option<PolicyRecord>, StoreError>;
    fn flush(&self) -> Result<(), StoreError>;
    /// Deletes a job, its short id and its targets' records (retention).
    fn delete_job(&self, id: &str) -> Result<u64, StoreError>;
    /// Jobs oldest first, at most `limit`.
    fn oldest_jobs(&self, limit: usize) -> Result<Vec<JobRecord>, StoreError>;
    /// Bytes the job and target records take (keys and values).
    fn job_bytes(&self) -> Result<u64, StoreError>;
    /// Releases the database (its files and lock); later calls fail.
    fn close(&self);
    /// A named tree of the same database for a subsystem that keeps its own
    /// keys (the audit trail, `crate::audit`), so that one `flush` makes
    /// both durable. Fetch it per use: the handle changes after a reopen.
    fn tree(&self, name: &str) -> Result<sled::Tree, StoreError>;
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
    inner: std::sync::RwLock<Option<std::sync::Arc<SledTrees>>>,
    closed: std::sync::atomic::AtomicBool,
}

struct SledTrees {
    db: sled::Db,
    tokens: sled::Tree,
    agents: sled::Tree,
    jobs: sled::Tree,
    job_short: sled::Tree,
    targets: sled::Tree,
    meta: sled::Tree,
}

/// `meta` key set once `job_short` holds every stored job's short id.
const SHORT_INDEX_BUILT: &[u8] = b"job_short_index_v1";

/// The short id of a stored job id; `None` for a key that is not a job id.
fn short_of(id: &[u8]) -> Option<String> {
    let id = std::str::from_utf8(id).ok()?;
    fleetcmd_core::ids::JobId::parse(id)
        .ok()
        .map(|j| j.short().to_string())
}

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

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("store records serialize to JSON")
}

fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

/// sled's page cache unless configured (`store_cache_bytes`): sled's own
/// default is 1 GiB, which a controller with a few hundred thousand results
/// fills, and the OS page cache holds the same pages again anyway.
pub const DEFAULT_CACHE_BYTES: u64 = 64 * 1024 * 1024;

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
            inner: std::sync::RwLock::new(Some(std::sync::Arc::new(trees))),
            closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The open database, reopening it if an I/O error poisoned the last one.
    fn trees(&self) -> Result<std::sync::Arc<SledTrees>, StoreError> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(StoreError::Backend("the store is closed".into()));
        }
        if let Some(t) = self
            .inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return Ok(t.clone());
        }
        let mut w = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = w.as_ref() {
            return Ok(t.clone());
        }
        let t = std::sync::Arc::new(open_trees(&self.path, self.cache_bytes)?);
        tracing::warn!(path = %self.path.display(), "database reopened after an I/O error");
        *w = Some(t.clone());
        Ok(t)
    }

    /// Maps a sled error; an I/O error drops the poisoned handle so the next
    /// call reopens the database.
    fn fail(&self, e: sled::Error) -> StoreError {
        if matches!(e, sled::Error::Io(_)) {
            *self.inner.write().unwrap_or_else(|p| p.into_inner()) = None;
        }
        StoreError::Backend(e.to_string())
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

impl Store for SledStore {
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
            // Comparing hashes, not secrets: timing reveals nothing an
            // attacker can steer, since they cannot choose SHA-256 outputs.
            if rec.secret_hash != secret_hash {
                return Ok(Err(TokenRefusal::Unknown));
            }
            if now > rec.expires_at {
                return Ok(Err(TokenRefusal::Expired));
            }
            if rec.uses_left == 0 {
                return Ok(Err(TokenRefusal::Used));
            }
            let mut next = rec.clone();
            next.uses_left -= 1;
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

    fn put_agent(&self, rec: &AgentRecord) -> Result<(), StoreError> {
        self.insert(&self.trees()?.agents, rec.id.as_bytes(), encode(rec))
    }

    fn get_agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
        self.get(&self.trees()?.agents, id)
    }

    fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.scan(self.trees()?.agents.iter())
    }

    fn put_job(&self, rec: &JobRecord) -> Result<(), StoreError> {
        self.insert(&self.trees()?.jobs, rec.id.as_bytes(), encode(rec))
    }

    fn get_job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        self.get(&self.trees()?.jobs, id)
    }

    fn claim_short_id(&self, short: &str, id: &str) -> Result<Option<String>, StoreError> {
        let taken = self
            .trees()?
            .job_short
            .compare_and_swap(short.as_bytes(), None as Option<&[u8]>, Some(id.as_bytes()))
            .map_err(|e| self.fail(e))?;
        Ok(match taken {
            Ok(()) => None,
            Err(cas) => cas
                .current
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .filter(|other| other != id),
        })
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

    fn list_jobs(&self, limit: usize) -> Result<Vec<JobRecord>, StoreError> {
        self.scan(self.trees()?.jobs.iter().rev().take(limit))
    }

    fn put_target(&self, job: &str, agent: &str, rec: &TargetRecord) -> Result<(), StoreError> {
        self.insert(
            &self.trees()?.targets,
            format!("{job}/{agent}").as_bytes(),
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
                .insert(format!("{job}/{agent}").as_bytes(), encode_target(rec))
                .map_err(|e| self.fail(e))?;
        }
        Ok(())
    }

    fn get_target(&self, job: &str, agent: &str) -> Result<Option<TargetRecord>, StoreError> {
        let key = format!("{job}/{agent}");
        self.trees()?
            .targets
            .get(key.as_bytes())
            .map_err(|e| self.fail(e))?
            .map(|v| decode_target(key.as_bytes(), &v))
            .transpose()
    }

    fn targets(&self, job: &str) -> Result<Vec<(String, TargetRecord)>, StoreError> {
        let prefix = format!("{job}/");
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

    fn put_policy(&self, rec: &PolicyRecord) -> Result<(), StoreError> {
        self.insert(&self.trees()?.meta, b"policy", encode(rec))
    }

    fn get_policy(&self) -> Result<Option<PolicyRecord>, StoreError> {
        self.get(&self.trees()?.meta, "policy")
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.trees()?.db.flush().map_err(|e| self.fail(e))?;
        Ok(())
    }

    fn delete_job(&self, id: &str) -> Result<u64, StoreError> {
        let t = self.trees()?;
        let prefix = format!("{id}/");
        let mut freed = 0u64;
        let keys: Vec<sled::IVec> = t
            .targets
            .scan_prefix(prefix.as_bytes())
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| self.fail(e))?;
        for k in keys {
            if let Some(v) = t.targets.remove(&k).map_err(|e| self.fail(e))? {
                freed += (k.len() + v.len()) as u64;
            }
        }
        if let Some(v) = t.jobs.remove(id.as_bytes()).map_err(|e| self.fail(e))? {
            freed += (id.len() + v.len()) as u64;
        }
        if let Some(short) = short_of(id.as_bytes()) {
            // Only if it names this job (an old store may have given it to
            // another one).
            t.job_short
                .compare_and_swap(short.as_bytes(), Some(id.as_bytes()), None as Option<&[u8]>)
                .map_err(|e| self.fail(e))?
                .ok();
        }
        Ok(freed)
    }

    fn oldest_jobs(&self, limit: usize) -> Result<Vec<JobRecord>, StoreError> {
        self.scan(self.trees()?.jobs.iter().take(limit))
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

    fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        let t = self.trees()?;
        t.db.open_tree(name).map_err(|e| self.fail(e))
    }

    fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(uses: u32) -> TokenRecord {
        TokenRecord {
            secret_hash: "ab".repeat(32),
            expires_at: 100,
            uses_left: uses,
            labels: BTreeMap::new(),
            name: None,
            created_by: "t".into(),
            replaces: None,
        }
    }

    #[test]
    fn single_use_token_is_consumed_exactly_once_under_concurrency() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = std::sync::Arc::new(SledStore::open(dir.path()).expect("open"));
        store.put_token("t1", &token(1)).expect("put");
        let winners: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let store = store.clone();
                    s.spawn(move || {
                        store
                            .consume_token("t1", &"ab".repeat(32), 50)
                            .expect("store")
                            .is_ok() as usize
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("thread")).sum()
        });
        assert_eq!(winners, 1);
        assert_eq!(
            store
                .consume_token("t1", &"ab".repeat(32), 50)
                .expect("store"),
            Err(TokenRefusal::Used)
        );
    }

    #[test]
    fn token_checks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        store.put_token("t", &token(2)).expect("put");
        assert_eq!(
            store
                .consume_token("t", &"cd".repeat(32), 50)
                .expect("store"),
            Err(TokenRefusal::Unknown)
        );
        assert_eq!(
            store
                .consume_token("nope", &"ab".repeat(32), 50)
                .expect("store"),
            Err(TokenRefusal::Unknown)
        );
        assert_eq!(
            store
                .consume_token("t", &"ab".repeat(32), 101)
                .expect("store"),
            Err(TokenRefusal::Expired)
        );
        assert!(
            store
                .consume_token("t", &"ab".repeat(32), 50)
                .expect("store")
                .is_ok()
        );
    }

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
    fn a_short_id_names_one_job_and_is_freed_with_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let short = "b302099a8057";
        assert_eq!(store.job_id_by_short(short).expect("get"), None);
        assert_eq!(store.claim_short_id(short, A).expect("claim"), None);
        // Claiming it again for the same job is not a clash.
        assert_eq!(store.claim_short_id(short, A).expect("claim"), None);
        assert_eq!(
            store.claim_short_id(short, B).expect("claim"),
            Some(A.to_string())
        );
        assert_eq!(store.job_id_by_short(short).expect("get"), Some(A.into()));
        // Retention deletes the job and frees its short id; deleting another
        // job never takes a short id it does not hold.
        store.delete_job(B).expect("delete");
        assert_eq!(store.job_id_by_short(short).expect("get"), Some(A.into()));
        store.delete_job(A).expect("delete");
        assert_eq!(store.job_id_by_short(short).expect("get"), None);
        assert_eq!(store.claim_short_id(short, B).expect("claim"), None);
    }

    #[test]
    fn concurrent_claims_of_one_short_id_have_one_winner() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = std::sync::Arc::new(SledStore::open(dir.path()).expect("open"));
        let ids: Vec<String> = (0..8)
            .map(|i| format!("01890a5d-ac96-70{i:02}-8000-b302099a8057"))
            .collect();
        let winners: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = ids
                .iter()
                .map(|id| {
                    let store = store.clone();
                    s.spawn(move || {
                        store
                            .claim_short_id("b302099a8057", id)
                            .expect("claim")
                            .is_none()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("join"))
                .collect()
        });
        assert_eq!(winners.iter().filter(|w| **w).count(), 1, "{winners:?}");
    }

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
