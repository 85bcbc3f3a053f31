//! The agent's result spool ("nothing lost"): a result is written
//! here before it is sent and removed only when the controller acknowledges
//! it (which it does after its own flush), so a result survives a lost
//! connection, a controller crash and an agent restart. A job also leaves a
//! `started` marker before it runs: a marker without a result after a
//! restart means the agent died mid-job, which is reported as such instead of
//! leaving the target `running` forever.
//!
//! Bounded: at most `MAX_SPOOLED` results (the oldest are dropped with a
//! warning beyond it — the controller fails such targets at their deadline).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fleetcmd_proto::v1 as pb;
use prost::Message;

use crate::state::{StateError, write_atomic};

/// Results kept while unacknowledged.
pub const MAX_SPOOLED: usize = 1024;

#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

impl Spool {
    pub fn open(state_dir: &Path) -> Result<Spool, StateError> {
        let dir = state_dir.join("spool");
        std::fs::create_dir_all(&dir).map_err(|source| StateError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Spool { dir })
    }

    fn result_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.result"))
    }

    fn started_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.started"))
    }

    /// Marks a job as started (before it runs).
    pub fn started(&self, id: &str) -> Result<(), StateError> {
        if !valid_id(id) {
            return Ok(());
        }
        write_atomic(&self.started_path(id), b"", 0o600)
    }

    /// Keeps a result until it is acknowledged; clears the started marker.
    pub fn put(&self, r: &pb::JobResult) -> Result<(), StateError> {
        if !valid_id(&r.job_id) {
            return Ok(());
        }
        write_atomic(&self.result_path(&r.job_id), &r.encode_to_vec(), 0o600)?;
        let _ = std::fs::remove_file(self.started_path(&r.job_id));
        Ok(())
    }

    /// The controller has the result durably.
    pub fn ack(&self, id: &str) {
        if valid_id(id) {
            let _ = std::fs::remove_file(self.result_path(id));
        }
    }

    /// Results to resend after a restart, including a failure for every job
    /// that was started but never finished (the agent died while it ran).
    pub fn recover(&self) -> Result<BTreeMap<String, pb::JobResult>, StateError> {
        let mut out = BTreeMap::new();
        let entries = std::fs::read_dir(&self.dir).map_err(|source| StateError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let mut started = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".result") {
                match std::fs::read(e.path())
                    .ok()
                    .and_then(|b| pb::JobResult::decode(b.as_slice()).ok())
                {
                    Some(r) if r.job_id == id => {
                        out.insert(id.to_owned(), r);
                    }
                    _ => {
                        tracing::warn!(file = %e.path().display(), "unreadable spooled result dropped");
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            } else if let Some(id) = name.strip_suffix(".started") {
                started.push(id.to_owned());
            } else if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        for id in started {
            if let std::collections::btree_map::Entry::Vacant(slot) = out.entry(id.clone()) {
                let r = pb::JobResult {
                    job_id: id,
                    outcome: pb::Outcome::Failed as i32,
                    reason_code: "agent_restarted".into(),
                    reason: "the agent stopped while the job was running; its outcome is unknown"
                        .into(),
                    ..Default::default()
                };
                self.put(&r)?;
                slot.insert(r);
            }
        }
        while out.len() > MAX_SPOOLED {
            if let Some((id, _)) = out.pop_first() {
                tracing::warn!(job_id = %id, "spool full: oldest unacknowledged result dropped");
                self.ack(&id);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_survive_until_acked_and_unfinished_jobs_are_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path()).expect("open");
        let id = "01890a5d-ac96-774b-bcce-b302099a8057";
        let other = "01890a5d-ac96-774b-bcce-b302099a8058";
        spool.started(id).expect("started");
        spool.started(other).expect("started");
        spool
            .put(&pb::JobResult {
                job_id: other.into(),
                outcome: pb::Outcome::Ok as i32,
                stdout: b"hi".to_vec(),
                ..Default::default()
            })
            .expect("put");
        let back = Spool::open(dir.path())
            .expect("reopen")
            .recover()
            .expect("recover");
        assert_eq!(back[other].stdout, b"hi");
        assert_eq!(back[id].reason_code, "agent_restarted");
        spool.ack(other);
        spool.ack(id);
        assert!(
            Spool::open(dir.path())
                .expect("reopen")
                .recover()
                .expect("recover")
                .is_empty()
        );
    }

    #[test]
    fn hostile_ids_never_become_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path()).expect("open");
        spool.started("../../etc/passwd").expect("ignored");
        spool
            .put(&pb::JobResult {
                job_id: "../x".into(),
                ..Default::default()
            })
            .expect("ignored");
        assert!(spool.recover().expect("recover").is_empty());
    }
}
