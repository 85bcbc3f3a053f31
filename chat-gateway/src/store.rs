//! The gateway's state on disk, in `state_dir` (default
//! [`DEFAULT_STATE_DIR`]): one sled database, one tree per kind of state,
//! each behind a narrow typed handle: the replay records of every inbound
//! HTTP path ([`ReplayGuard`]), and [`Records`] trees of versioned JSON
//! records for what the gateway still owes the chat (job results to post:
//! `crate::owed`; pending approvals: `crate::approvals`), so a restart
//! forgets none of them.
//!
//! Records are durable before the caller acts on them (record, flush, then
//! act): a request accepted once is refused after any restart, for as long
//! as its record is kept.
//!
//! Records are evidence the gateway acts on after a restart (approvals it
//! will attest, channels it will post a job's output to), so each is
//! sealed: signed with the gateway's own signing key over the tree, the key
//! and the record's exact bytes ([`Seal`]). A record changed, added or
//! moved outside the gateway does not verify and is never acted on (found
//! by an outside test: a name added to a stored approval was attested and
//! the job ran; an owed record re-pointed posted a job's output to another
//! channel). Whoever can read the signing key can still forge records —
//! write access to `state_dir` and the key are the same trust — but the
//! state alone grants nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use fleetcmd_core::crypto::{PublicKey, SigningKey, verify};

/// Where the gateway keeps its state unless `state_dir` says otherwise
/// (systemd's `StateDirectory=fleetcmd/gateway`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/fleetcmd/gateway";
/// Replay records kept at most. When every one is still inside its window,
/// new requests are refused (503) rather than remembered without bound or
/// forgotten early.
pub const MAX_REPLAY_RECORDS: usize = 100_000;
/// Expired records are pruned after this many new ones (and when full).
const PRUNE_EVERY: usize = 1024;

const REPLAY_TREE: &str = "replay";

/// Why the store could not be opened or written.
#[derive(thiserror::Error, Debug)]
pub enum StoreError {
    #[error("state_dir {dir}: {message}")]
    Open { dir: PathBuf, message: String },
    #[error("gateway state: {0}")]
    Io(String),
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

/// The open state directory. Cheap to clone; the database closes when the
/// last clone (and every handle taken from it) is dropped, so a second
/// gateway on the same directory is refused while the first runs.
#[derive(Clone)]
pub struct GatewayStore {
    db: sled::Db,
    /// One flush at a time across every tree (see [`ReplayInner::flushing`]:
    /// sled flushes the whole database, and concurrent flushes deadlocked).
    flushing: Arc<std::sync::Mutex<()>>,
}

impl std::fmt::Debug for GatewayStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayStore").finish_non_exhaustive()
    }
}

/// The state dir holds what the gateway owes the chat (pending approvals,
/// followed jobs) and its replay records: whoever else can write it can
/// erase a pending approval without any audit record (found by an outside
/// test). It must be this process's own, writable by nobody else.
fn check_private(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(dir).map_err(|e| e.to_string())?;
    // /proc/self belongs to the process's effective user.
    let me = std::fs::metadata("/proc/self")
        .map_err(|e| format!("/proc/self: {e}"))?
        .uid();
    if meta.uid() != me {
        return Err(format!(
            "owned by uid {}, not by this gateway's user (uid {me}): chown it, or use a state_dir of its own",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "writable by group or others (mode {:o}): chmod 0700 it",
            meta.mode() & 0o777
        ));
    }
    Ok(())
}

/// What `fleetcmd-gateway validate` checks of `state_dir` without opening
/// it: missing is fine (created 0700 at start); present, it must pass the
/// same ownership and mode check as at start.
pub fn check_state_dir(dir: &Path) -> Result<(), StoreError> {
    if !dir.exists() {
        return Ok(());
    }
    check_private(dir).map_err(|message| StoreError::Open {
        dir: dir.to_path_buf(),
        message,
    })
}

impl GatewayStore {
    /// Opens the state directory `dir` (created with mode 0700 if missing).
    pub fn open(dir: &Path) -> Result<GatewayStore, StoreError> {
        let fail = |message: String| StoreError::Open {
            dir: dir.to_path_buf(),
            message,
        };
        // Created 0700 when missing; an existing directory keeps the mode
        // its owner gave it (systemd's StateDirectory=, tmpfiles.d).
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir).map_err(|e| fail(e.to_string()))?;
        check_private(dir).map_err(fail)?;
        let path = dir.join("state.sled");
        let db = sled::Config::new()
            .path(&path)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.to_string().contains("could not acquire lock") =>
                {
                    fail("in use by another gateway".into())
                }
                e => fail(format!(
                    "the state store {} cannot be read ({e}). To start with an empty state, \
                 move it aside (`mv {0} {0}.broken`) and start again: pending approvals and \
                 unposted results are then lost (the controller keeps every job and its result: \
                 `fleetcmd jobs`), and replay records start empty",
                    path.display()
                )),
            })?;
        // Pending approval texts and whole signed jobs: readable by this
        // user only, whatever the mode of `dir` (sled creates its files 0644).
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| fail(format!("{}: {e}", path.display())))?;
        }
        Ok(GatewayStore {
            db,
            flushing: Arc::default(),
        })
    }

    /// Opens `dir` again in the same process: sled releases the previous
    /// handle's file lock from a background thread, a moment after the
    /// last handle is dropped, so this waits up to 5 s for it (tests only:
    /// a restarted gateway is a new process).
    #[cfg(test)]
    pub(crate) fn reopen(dir: &Path) -> Result<GatewayStore, StoreError> {
        let start = std::time::Instant::now();
        loop {
            match GatewayStore::open(dir) {
                Err(e) if e.to_string().contains("in use") && start.elapsed().as_secs() < 5 => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    /// A store that lives only as long as this process (tests, and tools
    /// that serve no inbound HTTP).
    pub fn temporary() -> Result<GatewayStore, StoreError> {
        let db = sled::Config::new().temporary(true).open()?;
        Ok(GatewayStore {
            db,
            flushing: Arc::default(),
        })
    }

    /// The replay records, pruned of expired ones.
    pub fn replay(&self) -> Result<ReplayGuard, StoreError> {
        let tree = self.db.open_tree(REPLAY_TREE)?;
        let guard = ReplayGuard {
            inner: Arc::new(ReplayInner {
                tree,
                count: AtomicUsize::new(0),
                since_prune: AtomicUsize::new(0),
                max: MAX_REPLAY_RECORDS,
                flushing: self.flushing.clone(),
            }),
            arbiter: None,
        };
        guard.prune(crate::unix_now())?;
        Ok(guard)
    }
}

impl GatewayStore {
    /// The records of tree `name`, typed as `T` (JSON values), sealed with
    /// `seal`.
    pub fn records<T>(&self, name: &'static str, seal: &Seal) -> Result<Records<T>, StoreError> {
        Ok(Records {
            tree: self.db.open_tree(name)?,
            name,
            flushing: self.flushing.clone(),
            seal: seal.clone(),
            _t: std::marker::PhantomData,
        })
    }
}

/// Signs the records the gateway writes and checks those it reads back
/// (the gateway's own job-signing key; see the module docs).
#[derive(Clone)]
pub struct Seal {
    key: Arc<SigningKey>,
    public: PublicKey,
}

impl std::fmt::Debug for Seal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seal")
            .field("key", &self.public.fingerprint())
            .finish()
    }
}

/// A record as stored: its JSON text and the seal over it.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Sealed {
    record: String,
    seal: String,
}

impl Seal {
    pub fn new(key: Arc<SigningKey>) -> Seal {
        let public = key.public_key();
        Seal { key, public }
    }

    /// A seal with a fresh key, for unit tests.
    #[cfg(test)]
    pub(crate) fn fresh() -> Seal {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).expect("keygen");
        Seal::new(Arc::new(
            SigningKey::from_pkcs8_der(pkcs8.as_ref()).expect("key"),
        ))
    }

    /// What is signed: the tree and the key bind a record to its place.
    fn message(tree: &str, key: &str, record: &str) -> Vec<u8> {
        format!("fleetcmd-gateway-record-v1\0{tree}\0{key}\0{record}").into_bytes()
    }

    fn wrap(&self, tree: &str, key: &str, record: String) -> Result<Vec<u8>, serde_json::Error> {
        let seal = STANDARD.encode(self.key.sign(&Self::message(tree, key, &record)));
        serde_json::to_vec(&Sealed { record, seal })
    }

    /// The record's JSON text, if its seal verifies; else why not.
    fn open(&self, tree: &str, key: &str, bytes: &[u8]) -> Result<String, String> {
        let sealed: Sealed = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let ok = STANDARD.decode(&sealed.seal).is_ok_and(|sig| {
            verify(
                &self.public,
                &Self::message(tree, key, &sealed.record),
                &sig,
            )
        });
        if ok {
            Ok(sealed.record)
        } else {
            Err("its seal does not verify: written by another key or changed outside the gateway; not acted on".into())
        }
    }
}

/// A tree of JSON records of one type, keyed by a string (a job id). Writes
/// land in memory at once ([`put`](Records::put), [`remove`](Records::remove)
/// do no I/O, so they may be called under a lock) and become durable with
/// [`flush`](Records::flush), which runs on the blocking pool, one flush at
/// a time for the whole store.
pub struct Records<T> {
    tree: sled::Tree,
    name: &'static str,
    flushing: Arc<std::sync::Mutex<()>>,
    seal: Seal,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T> Clone for Records<T> {
    fn clone(&self) -> Self {
        Records {
            tree: self.tree.clone(),
            name: self.name,
            flushing: self.flushing.clone(),
            seal: self.seal.clone(),
            _t: std::marker::PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for Records<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records")
            .field("tree", &self.name)
            .field("len", &self.tree.len())
            .finish()
    }
}

/// A stored record that could not be read back, with why; it is never
/// acted on (the caller reports and removes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    /// The record's key as stored (lossy UTF-8).
    pub key: String,
    pub reason: String,
}

/// One record read back: its key and value, or why it is unreadable.
pub type Loaded<T> = Result<(String, T), Unreadable>;

impl<T: serde::Serialize + serde::de::DeserializeOwned> Records<T> {
    /// Writes `value` under `key` (in memory until the next flush).
    pub fn put(&self, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_string(value)
            .and_then(|json| self.seal.wrap(self.name, key, json))
            .map_err(|e| StoreError::Io(format!("{} {key}: {e}", self.name)))?;
        self.tree.insert(key.as_bytes(), bytes)?;
        Ok(())
    }

    /// Removes `key` (in memory until the next flush); true if it was there.
    pub fn remove(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.tree.remove(key.as_bytes())?.is_some())
    }

    /// Every record, in key order; those that do not parse as `T` come
    /// back as [`Unreadable`] with the reason.
    pub fn all(&self) -> Result<Vec<Loaded<T>>, StoreError> {
        let mut out = Vec::new();
        for entry in self.tree.iter() {
            let (k, v) = entry?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let read = self
                .seal
                .open(self.name, &key, &v)
                .and_then(|json| serde_json::from_str::<T>(&json).map_err(|e| e.to_string()));
            out.push(match read {
                Ok(t) => Ok((key, t)),
                Err(e) => Err(Unreadable {
                    reason: format!("unreadable {} record {key}: {e}", self.name),
                    key,
                }),
            });
        }
        Ok(out)
    }

    /// Makes every write so far durable (the whole store's), on the
    /// blocking pool.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let tree = self.tree.clone();
        let flushing = self.flushing.clone();
        tokio::task::spawn_blocking(move || {
            let _one = flushing.lock().unwrap_or_else(|p| p.into_inner());
            tree.flush().map(|_| ())
        })
        .await
        .map_err(|e| StoreError::Io(e.to_string()))?
        .map_err(StoreError::from)
    }

    /// The bytes stored under `key`: for tests that tamper with a record.
    pub fn get_raw(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree.get(key.as_bytes())?.map(|v| v.to_vec()))
    }

    /// Writes raw bytes under `key`: for tests that plant a damaged record.
    pub fn put_raw(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.tree.insert(key.as_bytes(), bytes)?;
        self.tree.flush()?;
        Ok(())
    }
}

/// What [`ReplayGuard::first_use`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Recorded now (durably): act on the request.
    First,
    /// Recorded before and still inside its window: a replay.
    Replay,
}

/// Why a request could not be recorded; it must not be acted on.
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum ReplayError {
    #[error("replay records full ({0} inside their window)")]
    Full(usize),
    #[error("replay records not written: {0}")]
    Storage(String),
}

/// Why [`ReplayGuard::admit`] refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Accepted before, inside its window: report it (`auth_failed`) and
    /// answer 409 or drop it.
    Replay,
    /// Not recorded (full, or the disk failed, or the claim among gateways
    /// could not be made; logged): answer 503 so the sender retries later.
    Unavailable,
    /// New here, but another gateway of this chat claimed it first and
    /// acts on it (`crate::claims`; logged): answer as if handled, say
    /// nothing in the chat, report nothing.
    Elsewhere,
}

/// The replay guard an adapter was given by the gateway (persisted, shared),
/// or, until then, one of its own that lasts as long as the process.
#[derive(Default)]
pub struct ReplaySlot(std::sync::RwLock<Option<ReplayGuard>>);

impl ReplaySlot {
    /// Uses `guard` from now on.
    pub fn set(&self, guard: ReplayGuard) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(guard);
    }

    /// The guard in use.
    pub fn get(&self) -> ReplayGuard {
        if let Some(g) = &*self.0.read().unwrap_or_else(|p| p.into_inner()) {
            return g.clone();
        }
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(ReplayGuard::in_process)
            .clone()
    }
}

impl std::fmt::Debug for ReplaySlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplaySlot")
    }
}

/// Remembers which inbound requests were accepted, until the end of the
/// window in which they could be presented again (a signature's validity,
/// a platform's retry window). One per gateway, shared by every adapter;
/// keys are namespaced by the caller's `scope`.
#[derive(Clone)]
pub struct ReplayGuard {
    inner: Arc<ReplayInner>,
    /// Asked about every request recorded here as new, so that of several
    /// gateways on one chat only one acts on it (`crate::claims`); `None`:
    /// this gateway is alone (tests, `fleetcmd dev`).
    arbiter: Option<Arc<dyn crate::claims::Arbiter>>,
}

struct ReplayInner {
    tree: sled::Tree,
    count: AtomicUsize,
    since_prune: AtomicUsize,
    max: usize,
    /// One flush at a time. sled 0.34's `flush_async` deadlocks when
    /// several run at once (its io threads stall in `make_stable`; an
    /// outside test wedged the gateway with ten concurrent signed
    /// requests). A blocking `flush` under this lock writes everything
    /// recorded so far, so callers that queue behind it find their record
    /// already durable: a group commit.
    flushing: Arc<std::sync::Mutex<()>>,
}

impl std::fmt::Debug for ReplayGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayGuard")
            .field("records", &self.inner.count.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn record_key(scope: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(scope.len() + key.len() + 1);
    k.extend_from_slice(scope.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

fn until_of(v: &[u8]) -> u64 {
    v.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

impl ReplayGuard {
    /// A guard on a store of its own that lasts as long as the process:
    /// what an adapter uses until the gateway gives it the shared one.
    pub fn in_process() -> ReplayGuard {
        GatewayStore::temporary()
            .and_then(|s| s.replay())
            .expect("a temporary sled database opens in memory")
    }

    /// Records `key` in `scope` as used until `keep_until` (unix seconds),
    /// durably, and says whether it was used before inside its window.
    /// `now` is the caller's clock (unix seconds).
    pub async fn first_use(
        &self,
        scope: &str,
        key: &str,
        keep_until: u64,
        now: u64,
    ) -> Result<Use, ReplayError> {
        let storage = |e: sled::Error| ReplayError::Storage(e.to_string());
        let k = record_key(scope, key);
        let tree = &self.inner.tree;
        let old = tree.get(&k).map_err(storage)?;
        if let Some(v) = &old
            && until_of(v) >= now
        {
            return Ok(Use::Replay);
        }
        if old.is_none() && self.inner.count.load(Ordering::Relaxed) >= self.inner.max {
            self.prune_blocking(now).await?;
            let n = self.inner.count.load(Ordering::Relaxed);
            if n >= self.inner.max {
                return Err(ReplayError::Full(n));
            }
        }
        let new = keep_until.max(now).to_be_bytes();
        match tree
            .compare_and_swap(&k, old.as_ref(), Some(&new[..]))
            .map_err(storage)?
        {
            Ok(()) => {}
            // Someone recorded it between our read and our write.
            Err(_) => return Ok(Use::Replay),
        }
        if old.is_none() {
            self.inner.count.fetch_add(1, Ordering::Relaxed);
        }
        self.flush_blocking().await?;
        if self.inner.since_prune.fetch_add(1, Ordering::Relaxed) + 1 >= PRUNE_EVERY {
            self.prune_blocking(now).await?;
        }
        Ok(Use::First)
    }

    /// Forgets `key` (the request was refused after it was recorded and
    /// may be presented again).
    pub fn forget(&self, scope: &str, key: &str) {
        if let Ok(Some(_)) = self.inner.tree.remove(record_key(scope, key)) {
            self.inner.count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Records kept now.
    pub fn len(&self) -> usize {
        self.inner.count.load(Ordering::Relaxed)
    }

    /// Whether no record is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes every record written so far durable, on the blocking pool.
    async fn flush_blocking(&self) -> Result<(), ReplayError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let _one = me.inner.flushing.lock().unwrap_or_else(|p| p.into_inner());
            me.inner.tree.flush().map(|_| ())
        })
        .await
        .map_err(|e| ReplayError::Storage(e.to_string()))?
        .map_err(|e| ReplayError::Storage(e.to_string()))
    }

    async fn prune_blocking(&self, now: u64) -> Result<(), ReplayError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.prune(now))
            .await
            .map_err(|e| ReplayError::Storage(e.to_string()))?
            .map_err(|e| ReplayError::Storage(e.to_string()))
    }

    /// Removes every record whose window ended before `now` and recounts.
    fn prune(&self, now: u64) -> Result<(), StoreError> {
        let tree = &self.inner.tree;
        let mut kept = 0usize;
        for entry in tree.iter() {
            let (k, v) = entry?;
            if until_of(&v) < now {
                tree.remove(k)?;
            } else {
                kept += 1;
            }
        }
        self.inner.count.store(kept, Ordering::Relaxed);
        self.inner.since_prune.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// This guard, asking `arbiter` about every request it records as new
    /// (several gateways on one chat: `crate::claims`).
    pub fn with_arbiter(self, arbiter: Arc<dyn crate::claims::Arbiter>) -> ReplayGuard {
        ReplayGuard {
            arbiter: Some(arbiter),
            ..self
        }
    }

    /// [`first_use`](Self::first_use) at the current time, as an inbound
    /// path answers it: `Ok` to act on the request, else why not. With an
    /// arbiter, a request new here is then claimed among the gateways for
    /// as long as it is kept here: lost, it is [`Refusal::Elsewhere`]; not
    /// decided (the controller unreachable), its record here is forgotten
    /// so the platform's next delivery is judged afresh, and it is
    /// [`Refusal::Unavailable`]: a command must not run twice.
    pub async fn admit(&self, scope: &str, key: &str, keep_until: u64) -> Result<(), Refusal> {
        let now = crate::unix_now();
        match self.first_use(scope, key, keep_until, now).await {
            Ok(Use::First) => {}
            Ok(Use::Replay) => return Err(Refusal::Replay),
            Err(e) => {
                tracing::error!(scope, error = %e, "request refused: replay record not kept");
                return Err(Refusal::Unavailable);
            }
        }
        let Some(arbiter) = &self.arbiter else {
            return Ok(());
        };
        let claim = crate::claims::key("replay", &[scope, key]);
        let ttl = std::time::Duration::from_secs(keep_until.saturating_sub(now));
        match arbiter.claim(claim.clone(), ttl).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                tracing::info!(scope, %claim, "request handled by another gateway; not acted on here");
                Err(Refusal::Elsewhere)
            }
            Err(e) => {
                self.forget(scope, key);
                tracing::error!(scope, %claim, error = %e, "request refused: cannot claim it among the gateways (the platform will deliver it again)");
                Err(Refusal::Unavailable)
            }
        }
    }

    #[cfg(test)]
    fn with_max(self, max: usize) -> ReplayGuard {
        let inner = Arc::into_inner(self.inner).expect("only handle");
        ReplayGuard {
            inner: Arc::new(ReplayInner { max, ..inner }),
            arbiter: self.arbiter,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record is acted on only as the gateway wrote it: changed, moved to
    /// another key or tree, or sealed by another key, it is unreadable.
    #[test]
    fn records_are_read_back_only_as_sealed() {
        let store = GatewayStore::temporary().expect("store");
        let seal = Seal::fresh();
        let records: Records<Vec<String>> = store.records("t", &seal).expect("tree");
        records.put("a", &vec!["bob".to_string()]).expect("put");
        let raw = records.get_raw("a").expect("get").expect("stored");
        let text = String::from_utf8(raw.clone()).expect("json");
        // Changed: another name added to the record, seal kept.
        let changed = text.replacen("[\\\"bob\\\"]", "[\\\"bob\\\",\\\"eve\\\"]", 1);
        assert_ne!(changed, text, "{text}");
        records.put_raw("changed", changed.as_bytes()).expect("raw");
        // Moved: the same bytes under another key, and in another tree.
        records.put_raw("moved", &raw).expect("raw");
        let other: Records<Vec<String>> = store.records("u", &seal).expect("tree");
        other.put_raw("a", &raw).expect("raw");
        // Sealed by another key.
        let stranger: Records<Vec<String>> = store.records("t", &Seal::fresh()).expect("tree");
        stranger
            .put("foreign", &vec!["eve".to_string()])
            .expect("put");
        // Unsealed, as an older gateway wrote records.
        records.put_raw("plain", b"[\"bob\"]").expect("raw");

        let loaded = records.all().expect("all");
        let ok: Vec<_> = loaded.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(ok, vec![&("a".to_string(), vec!["bob".to_string()])]);
        for r in loaded.iter().filter_map(|r| r.as_ref().err()) {
            assert!(
                ["changed", "moved", "foreign", "plain"].contains(&r.key.as_str()),
                "{r:?}"
            );
        }
        let reasons: Vec<_> = loaded
            .iter()
            .filter_map(|r| r.as_ref().err())
            .filter(|r| r.key != "plain")
            .map(|r| r.reason.clone())
            .collect();
        assert_eq!(reasons.len(), 3, "{loaded:?}");
        assert!(
            reasons.iter().all(|r| r.contains("seal does not verify")),
            "{reasons:?}"
        );
        let moved = other.all().expect("all");
        assert!(moved[0].is_err(), "{moved:?}");
    }

    /// Answers claims from a script: `Some(won)` per call, `None` for a
    /// controller that cannot be reached; records the keys asked.
    struct Scripted(std::sync::Mutex<(Vec<Option<bool>>, Vec<String>)>);

    impl crate::claims::Arbiter for Scripted {
        fn claim(
            &self,
            key: String,
            _ttl: std::time::Duration,
        ) -> crate::adapters::BoxFuture<'_, Result<bool, crate::controller::ControllerError>>
        {
            let mut s = self.0.lock().expect("script");
            s.1.push(key);
            let next = s.0.remove(0);
            Box::pin(async move {
                next.ok_or(crate::controller::ControllerError {
                    code: tonic::Code::Unavailable,
                    message: "connection refused".into(),
                })
            })
        }
    }

    /// With an arbiter, a request new here is claimed among the gateways:
    /// won, acted on; lost, `Elsewhere` and a replay here from then on
    /// (never asked again); not decided, refused as busy and forgotten
    /// here, so the platform's next delivery is judged afresh.
    #[tokio::test]
    async fn requests_new_here_are_claimed_among_the_gateways() {
        let script = Arc::new(Scripted(std::sync::Mutex::new((
            vec![Some(true), Some(false), None, Some(true)],
            Vec::new(),
        ))));
        let guard = GatewayStore::temporary()
            .and_then(|s| s.replay())
            .expect("guard")
            .with_arbiter(script.clone());
        let until = crate::unix_now() + 600;
        assert_eq!(guard.admit("slack", "event:Ev1", until).await, Ok(()));
        assert_eq!(
            guard.admit("slack", "event:Ev1", until).await,
            Err(Refusal::Replay)
        );
        assert_eq!(
            guard.admit("slack", "event:Ev2", until).await,
            Err(Refusal::Elsewhere)
        );
        assert_eq!(
            guard.admit("slack", "event:Ev2", until).await,
            Err(Refusal::Replay),
            "lost once, kept here: a retry is not asked about again"
        );
        assert_eq!(
            guard.admit("slack", "event:Ev3", until).await,
            Err(Refusal::Unavailable)
        );
        assert_eq!(
            guard.admit("slack", "event:Ev3", until).await,
            Ok(()),
            "forgotten after the failed claim: the next delivery is claimed again"
        );
        let asked = script.0.lock().expect("script").1.clone();
        assert_eq!(
            asked,
            ["event:Ev1", "event:Ev2", "event:Ev3", "event:Ev3"]
                .map(|k| crate::claims::key("replay", &["slack", k]))
        );
    }

    #[tokio::test]
    async fn records_survive_a_reopen_until_their_window_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Opening prunes at the real clock, so the records live around it.
        let now = crate::unix_now();
        {
            let g = GatewayStore::open(dir.path())
                .and_then(|s| s.replay())
                .expect("open");
            for (scope, key, until, want) in [
                ("webhook", "sig-a", now + 600, Use::First),
                ("webhook", "sig-a", now + 600, Use::Replay),
                ("slack", "sig-a", now + 600, Use::First),
                ("webhook", "sig-b", now + 5, Use::First),
            ] {
                assert_eq!(
                    g.first_use(scope, key, until, now).await,
                    Ok(want),
                    "{scope} {key}"
                );
            }
        }
        let g = GatewayStore::reopen(dir.path())
            .and_then(|s| s.replay())
            .expect("reopen");
        for (key, at, want) in [
            ("sig-a", now + 10, Use::Replay),
            ("sig-b", now + 4, Use::Replay),
            ("sig-b", now + 6, Use::First),
        ] {
            assert_eq!(
                g.first_use("webhook", key, now + 600, at).await,
                Ok(want),
                "{key} at {at}"
            );
        }
    }

    #[tokio::test]
    async fn full_refuses_new_records_until_old_ones_expire() {
        let g = GatewayStore::temporary()
            .and_then(|s| s.replay())
            .expect("open")
            .with_max(2);
        assert_eq!(g.first_use("s", "a", 10, 1).await, Ok(Use::First));
        assert_eq!(g.first_use("s", "b", 20, 1).await, Ok(Use::First));
        assert_eq!(
            g.first_use("s", "c", 20, 1).await,
            Err(ReplayError::Full(2))
        );
        // "a" expired at 10: pruned, room for "c".
        assert_eq!(g.first_use("s", "c", 20, 11).await, Ok(Use::First));
        assert_eq!(g.len(), 2);
        g.forget("s", "c");
        assert_eq!(g.first_use("s", "c", 20, 11).await, Ok(Use::First));
    }

    #[test]
    fn a_state_dir_others_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        std::fs::create_dir(&state).expect("dir");
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = GatewayStore::open(&state).expect_err("a 0777 state dir");
        assert!(
            err.to_string().contains("writable by group or others"),
            "{err}"
        );
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        GatewayStore::open(&state).expect("a private state dir");
    }

    /// Ten and more signed requests at once wedged the gateway for good
    /// (concurrent `flush_async`): every record of a burst of 400 requests,
    /// 50 at a time, is taken and durable, in bounded time, and survives
    /// a reopen.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_burst_of_concurrent_records_never_wedges_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = crate::unix_now();
        {
            let g = GatewayStore::open(dir.path())
                .and_then(|s| s.replay())
                .expect("open");
            let burst = async {
                for round in 0..8 {
                    let mut set = tokio::task::JoinSet::new();
                    for i in 0..50 {
                        let g = g.clone();
                        set.spawn(async move {
                            g.first_use("hook", &format!("sig-{round}-{i}"), now + 300, now)
                                .await
                        });
                    }
                    while let Some(r) = set.join_next().await {
                        assert_eq!(r.expect("task").expect("recorded"), Use::First);
                    }
                }
            };
            tokio::time::timeout(std::time::Duration::from_secs(60), burst)
                .await
                .expect("the burst finished: no flush deadlock");
            assert_eq!(g.len(), 400);
        }
        let g = GatewayStore::reopen(dir.path())
            .and_then(|s| s.replay())
            .expect("reopen");
        assert_eq!(
            g.first_use("hook", "sig-7-49", now + 300, now).await.ok(),
            Some(Use::Replay)
        );
    }

    #[test]
    fn a_second_gateway_on_the_same_dir_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = GatewayStore::open(dir.path()).expect("open");
        let e = GatewayStore::open(dir.path()).expect_err("second open");
        assert!(
            e.to_string().contains("state_dir")
                && e.to_string().contains("in use by another gateway"),
            "{e}"
        );
    }
}
