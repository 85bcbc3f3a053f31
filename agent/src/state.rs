//! What the agent keeps on disk in its state directory: its key and
//! certificate, the pinned CA and policy roots, the last good policy bundle
//! with the highest version seen (so rollback is refused across restarts),
//! and the set of job ids already seen (so replay is refused across
//! restarts). Every write is atomic (temp file, fsync, rename).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use fleetcmd_core::crypto::PublicKey;
use fleetcmd_core::policy::Policy;
use fleetcmd_core::policy_bundle::{self, PolicySignature};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{0}: not joined yet; run `fleetcmd-agent join --controller URL --token TOKEN`")]
    NotJoined(PathBuf),
}

pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), StateError> {
    let io = |source| StateError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(contents).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, StateError> {
    std::fs::read_to_string(path).map_err(|source| StateError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Who this agent is, as the controller decided at join time.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub agent_id: String,
    /// Labels set by the join token.
    pub labels: BTreeMap<String, String>,
    /// Raw Ed25519 policy root keys, base64 (pinned at join).
    pub policy_roots: Vec<String>,
    pub policy_threshold: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyState {
    highest_version: u64,
    bundle: Vec<u8>,
    signatures: Vec<(String, Vec<u8>)>,
}

/// Paths of the state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: &Path) -> StateDir {
        StateDir {
            dir: dir.to_owned(),
        }
    }
    pub fn key(&self) -> PathBuf {
        self.dir.join("agent.key")
    }
    pub fn cert(&self) -> PathBuf {
        self.dir.join("agent.crt")
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    fn identity_path(&self) -> PathBuf {
        self.dir.join("identity.json")
    }
    fn policy_path(&self) -> PathBuf {
        self.dir.join("policy.json")
    }
    fn seen_path(&self) -> PathBuf {
        self.dir.join("seen.json")
    }

    pub fn create(&self) -> Result<(), StateError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|source| StateError::Io {
                path: self.dir.clone(),
                source,
            })
    }

    pub fn save_identity(&self, id: &Identity) -> Result<(), StateError> {
        let json = serde_json::to_vec_pretty(id).expect("identity serializes");
        write_atomic(&self.identity_path(), &json, 0o600)
    }

    pub fn load_identity(&self) -> Result<Identity, StateError> {
        let path = self.identity_path();
        if !path.exists() {
            return Err(StateError::NotJoined(self.dir.clone()));
        }
        serde_json::from_str(&read(&path)?).map_err(|e| StateError::Invalid {
            path,
            reason: e.to_string(),
        })
    }

    fn next(path: &Path) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(".next");
        PathBuf::from(name)
    }

    /// Replaces key and certificate together (a renewal into a new key):
    /// both are written beside the current ones as `.next`, the
    /// certificate last, so an existing `agent.crt.next` means a complete
    /// pair; then each is renamed into place. A crash at any point leaves
    /// either the old pair or something [`Self::client_tls`] completes.
    pub fn replace_key_and_cert(&self, key_pem: &str, cert_pem: &str) -> Result<(), StateError> {
        write_atomic(&Self::next(&self.key()), key_pem.as_bytes(), 0o600)?;
        write_atomic(&Self::next(&self.cert()), cert_pem.as_bytes(), 0o644)?;
        self.finish_replacement()
    }

    /// Completes a replacement that a crash interrupted, or drops a new
    /// key that never got its certificate.
    fn finish_replacement(&self) -> Result<(), StateError> {
        let rename = |from: &Path, to: &Path| {
            std::fs::rename(from, to).map_err(|source| StateError::Io {
                path: from.to_owned(),
                source,
            })
        };
        let (key_next, cert_next) = (Self::next(&self.key()), Self::next(&self.cert()));
        if cert_next.exists() {
            if key_next.exists() {
                rename(&key_next, &self.key())?;
            }
            rename(&cert_next, &self.cert())?;
        } else if key_next.exists() {
            std::fs::remove_file(&key_next).map_err(|source| StateError::Io {
                path: key_next.clone(),
                source,
            })?;
        } else {
            return Ok(());
        }
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Client TLS material (re-read at every connection: the certificate is
    /// renewed in place, and a renewal into a new key a crash interrupted
    /// is completed first).
    pub fn client_tls(&self) -> Result<fleetcmd_proto::channel::ClientTls, StateError> {
        self.finish_replacement()?;
        Ok(fleetcmd_proto::channel::ClientTls {
            ca_pem: read(&self.ca())?,
            cert_pem: read(&self.cert())?,
            key_pem: read(&self.key())?,
        })
    }
}

impl Identity {
    pub fn roots(&self) -> Result<Vec<PublicKey>, String> {
        self.policy_roots
            .iter()
            .map(|r| PublicKey::parse(r).map_err(|e| format!("policy root {r}: {e}")))
            .collect()
    }
}

/// The current policy and the highest version ever accepted.
#[derive(Debug)]
pub struct PolicyStore {
    path: PathBuf,
    roots: Vec<PublicKey>,
    threshold: usize,
    highest: u64,
    current: Option<(Policy, String)>,
}

impl PolicyStore {
    /// Loads the last good bundle, verifying it again.
    pub fn load(
        dir: &StateDir,
        roots: Vec<PublicKey>,
        threshold: usize,
    ) -> Result<PolicyStore, StateError> {
        let path = dir.policy_path();
        let mut store = PolicyStore {
            path: path.clone(),
            roots,
            threshold,
            highest: 0,
            current: None,
        };
        if path.exists() {
            let st: PolicyState =
                serde_json::from_str(&read(&path)?).map_err(|e| StateError::Invalid {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            store.highest = st.highest_version;
            if !st.bundle.is_empty() {
                let sigs: Vec<PolicySignature> = st
                    .signatures
                    .iter()
                    .map(|(k, s)| PolicySignature {
                        key_id: k.clone(),
                        signature: s.clone(),
                    })
                    .collect();
                match policy_bundle::verify_bundle(&st.bundle, &sigs, &store.roots, store.threshold)
                {
                    Ok(p) => store.current = Some((p, policy_bundle::bundle_hash(&st.bundle))),
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "stored policy does not verify; waiting for a new one")
                    }
                }
            }
        }
        Ok(store)
    }

    pub fn current(&self) -> Option<&Policy> {
        self.current.as_ref().map(|(p, _)| p)
    }

    pub fn version(&self) -> u64 {
        self.current.as_ref().map(|(p, _)| p.version).unwrap_or(0)
    }

    /// Verifies a bundle (signature, threshold, strictly higher version) and
    /// makes it current; the previous one stays if anything is wrong.
    pub fn offer(&mut self, bundle: &[u8], sigs: &[PolicySignature]) -> Result<u64, String> {
        if self
            .current
            .as_ref()
            .is_some_and(|(_, h)| *h == policy_bundle::bundle_hash(bundle))
        {
            return Ok(self.version()); // the same bundle again (reconnect)
        }
        let policy = policy_bundle::verify_bundle(bundle, sigs, &self.roots, self.threshold)
            .map_err(|e| e.to_string())?;
        let floor = (self.highest > 0).then_some(self.highest);
        policy_bundle::check_rollback(floor, &policy).map_err(|e| e.to_string())?;
        let st = PolicyState {
            highest_version: policy.version,
            bundle: bundle.to_vec(),
            signatures: sigs
                .iter()
                .map(|s| (s.key_id.clone(), s.signature.clone()))
                .collect(),
        };
        write_atomic(
            &self.path,
            &serde_json::to_vec(&st).expect("policy state serializes"),
            0o600,
        )
        .map_err(|e| e.to_string())?;
        self.highest = policy.version;
        let version = policy.version;
        self.current = Some((policy, policy_bundle::bundle_hash(bundle)));
        Ok(version)
    }
}

/// Job ids already seen, kept until they expire (plus the skew allowance),
/// and never longer than the policy's `max_job_lifetime` (plus skew) from
/// now: a job valid for longer is refused anyway, so its id need not be
/// remembered, and a job signed for ten years cannot make the agent
/// remember its id for ten years.
#[derive(Debug)]
pub struct SeenSet {
    path: PathBuf,
    ids: BTreeMap<String, u64>,
}

/// Whether an id expiring at `exp` must still be remembered at `now`, when
/// no job valid for longer than `max_lifetime` seconds is accepted. An
/// accepted job has `not_before <= now + skew` and `expires_at <=
/// not_before + max_lifetime`; one expiring later than that is refused
/// whether or not its id is remembered.
fn keep(exp: u64, now: u64, max_lifetime: u64) -> bool {
    let skew = fleetcmd_core::job::CLOCK_SKEW_SECS;
    exp.saturating_add(skew) >= now && exp <= now.saturating_add(max_lifetime + skew)
}

impl SeenSet {
    /// Loads the set; ids beyond the largest `max_job_lifetime` any policy
    /// may set (from before the limit existed) are forgotten.
    pub fn load(dir: &StateDir, now: u64) -> Result<SeenSet, StateError> {
        let path = dir.seen_path();
        let mut ids: BTreeMap<String, u64> = if path.exists() {
            serde_json::from_str(&read(&path)?).map_err(|e| StateError::Invalid {
                path: path.clone(),
                reason: e.to_string(),
            })?
        } else {
            BTreeMap::new()
        };
        let ceiling = fleetcmd_core::policy::defaults::MAX_JOB_LIFETIME_CEILING.as_secs();
        ids.retain(|_, exp| keep(*exp, now, ceiling));
        Ok(SeenSet { path, ids })
    }

    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains_key(id)
    }

    /// Records an id durably before the job runs; forgets expired ones and
    /// those beyond `max_lifetime` (the current policy's, in seconds).
    pub fn insert(
        &mut self,
        id: &str,
        expires_at: u64,
        now: u64,
        max_lifetime: u64,
    ) -> Result<(), StateError> {
        self.ids.retain(|_, exp| keep(*exp, now, max_lifetime));
        self.ids.insert(id.to_owned(), expires_at);
        write_atomic(
            &self.path,
            &serde_json::to_vec(&self.ids).expect("seen set serializes"),
            0o600,
        )
    }

    /// The remembered ids and their expiry (unix seconds).
    pub fn entries(&self) -> &BTreeMap<String, u64> {
        &self.ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;
    const DAY: u64 = 86_400;

    #[test]
    fn seen_ids_are_kept_no_longer_than_the_lifetime_bound() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = StateDir::new(tmp.path());
        let skew = fleetcmd_core::job::CLOCK_SKEW_SECS;
        let ten_years = 10 * 365 * DAY;
        // Written by an agent from before the limit: one id for ten years.
        let old: BTreeMap<String, u64> = BTreeMap::from([
            ("ten-years".to_string(), NOW + ten_years),
            ("a-day".to_string(), NOW + DAY),
            ("expired".to_string(), NOW - skew - 1),
            ("in-skew".to_string(), NOW - skew),
        ]);
        write_atomic(
            &dir.seen_path(),
            &serde_json::to_vec(&old).expect("json"),
            0o600,
        )
        .expect("write");
        let mut seen = SeenSet::load(&dir, NOW).expect("load");
        assert_eq!(
            seen.entries().keys().collect::<Vec<_>>(),
            ["a-day", "in-skew"]
        );
        // With a policy bound of one hour, a day-long id is not kept either.
        seen.insert("new", NOW + 3600, NOW, 3600).expect("insert");
        assert_eq!(
            seen.entries().keys().collect::<Vec<_>>(),
            ["in-skew", "new"]
        );
        // The bound is inclusive of the skew allowance.
        seen.insert("edge", NOW + 3600 + skew, NOW, 3600)
            .expect("insert");
        assert!(seen.contains("edge") && seen.contains("new"));
        let reloaded = SeenSet::load(&dir, NOW).expect("reload");
        assert_eq!(reloaded.entries(), seen.entries());
        let later = SeenSet::load(&dir, NOW + 3600 + 2 * skew).expect("reload later");
        assert_eq!(later.entries().keys().collect::<Vec<_>>(), ["edge"]);
    }
}
