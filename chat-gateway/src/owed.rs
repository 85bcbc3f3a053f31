//! Job results the gateway still owes the chat: one record per job it
//! submits and follows, made durable *before* the job is submitted and
//! removed once its result (or "stopped following") was posted. After a
//! restart the router follows every recorded job again and posts its
//! result ([`crate::resume`]); a job the controller never received is
//! submitted then, with the same signed bytes.
//!
//! A result posted just before a crash, whose record was not yet removed,
//! is posted again after the restart: the window is one flush long.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use fleetcmd_core::ids::Identity;
use fleetcmd_core::job::SignedJob;
use serde::{Deserialize, Serialize};

use crate::store::{GatewayStore, Records, Seal, StoreError, Unreadable};

/// The sled tree of owed job records.
pub const TREE: &str = "owed_jobs";
/// The version of [`OwedJob`] written now; others are reported unreadable.
pub const RECORD_VERSION: u32 = 1;

/// What the gateway owes the chat for one job.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OwedJob {
    /// [`RECORD_VERSION`].
    pub v: u32,
    pub job_id: String,
    pub command: String,
    pub requester: Identity,
    /// Where the result goes (its scheme names the adapter).
    pub channel: String,
    pub thread: Option<String>,
    /// The platform id of the posted "job … submitted" message, edited with
    /// the result where the platform can edit.
    pub message: Option<String>,
    /// Unix seconds after which the job is no longer followed.
    pub follow_until: u64,
    /// The signed job, submitted after a restart if the controller never
    /// got it.
    pub signed: StoredJob,
}

/// A [`SignedJob`] as stored (base64 bytes).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoredJob {
    pub spec: String,
    pub signature: String,
    pub key_id: String,
}

impl StoredJob {
    pub fn of(job: &SignedJob) -> StoredJob {
        StoredJob {
            spec: STANDARD.encode(&job.spec),
            signature: STANDARD.encode(&job.signature),
            key_id: job.key_id.clone(),
        }
    }

    /// The signed job back; an error names the damaged field.
    pub fn signed(&self) -> Result<SignedJob, String> {
        let decode = |what: &str, s: &str| {
            STANDARD
                .decode(s)
                .map_err(|e| format!("stored job {what}: {e}"))
        };
        Ok(SignedJob {
            spec: decode("spec", &self.spec)?,
            signature: decode("signature", &self.signature)?,
            key_id: self.key_id.clone(),
        })
    }
}

/// The owed job records of one gateway.
#[derive(Clone, Debug)]
pub struct OwedJobs {
    records: Records<OwedJob>,
}

impl OwedJobs {
    pub fn open(store: &GatewayStore, seal: &Seal) -> Result<OwedJobs, StoreError> {
        Ok(OwedJobs {
            records: store.records(TREE, seal)?,
        })
    }

    /// Records `job` as owed, durably.
    pub async fn owe(&self, job: &OwedJob) -> Result<(), StoreError> {
        self.records.put(&job.job_id, job)?;
        self.records.flush().await
    }

    /// Remembers the id of the message to edit with the result.
    pub async fn posted(&self, job: &OwedJob) -> Result<(), StoreError> {
        self.owe(job).await
    }

    /// The result of `job_id` was posted: nothing is owed any more.
    pub async fn paid(&self, job_id: &str) -> Result<(), StoreError> {
        if self.records.remove(job_id)? {
            self.records.flush().await?;
        }
        Ok(())
    }

    /// Every record; unreadable ones (damaged, or of an unknown version)
    /// with the reason.
    pub fn load(&self) -> Result<Vec<Result<OwedJob, Unreadable>>, StoreError> {
        Ok(self
            .records
            .all()?
            .into_iter()
            .map(|r| match r {
                Ok((_, job)) if job.v == RECORD_VERSION => Ok(job),
                Ok((key, job)) => Err(Unreadable {
                    key,
                    reason: format!(
                        "owed job record version {} (this gateway reads {RECORD_VERSION})",
                        job.v
                    ),
                }),
                Err(u) => Err(u),
            })
            .collect())
    }

    /// The raw tree, for tests that plant damaged records.
    pub fn records(&self) -> &Records<OwedJob> {
        &self.records
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str) -> OwedJob {
        OwedJob {
            v: RECORD_VERSION,
            job_id: id.to_string(),
            command: "uptime".into(),
            requester: Identity::parse("console:alice").expect("identity"),
            channel: "console".into(),
            thread: None,
            message: None,
            follow_until: 100,
            signed: StoredJob::of(&SignedJob {
                spec: b"{}".to_vec(),
                signature: vec![1, 2, 3],
                key_id: "gw".into(),
            }),
        }
    }

    #[tokio::test]
    async fn owed_jobs_survive_a_reopen_until_paid_and_damage_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let seal = Seal::fresh();
        {
            let owed = GatewayStore::open(dir.path())
                .and_then(|s| OwedJobs::open(&s, &seal))
                .expect("open");
            owed.owe(&job("a")).await.expect("owe a");
            let mut b = job("b");
            owed.owe(&b).await.expect("owe b");
            b.message = Some("42".into());
            owed.posted(&b).await.expect("posted b");
            owed.owe(&job("c")).await.expect("owe c");
            owed.paid("c").await.expect("paid c");
            let mut future = job("d");
            future.v = RECORD_VERSION + 1;
            owed.owe(&future).await.expect("owe d");
            owed.records().put_raw("e", b"{not json").expect("raw");
        }
        let owed = GatewayStore::reopen(dir.path())
            .and_then(|s| OwedJobs::open(&s, &seal))
            .expect("reopen");
        let loaded = owed.load().expect("load");
        let ok: Vec<_> = loaded.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(ok.len(), 2, "{loaded:?}");
        assert_eq!(ok[0].job_id, "a");
        assert_eq!(ok[1].message.as_deref(), Some("42"));
        let bad: Vec<_> = loaded.iter().filter_map(|r| r.as_ref().err()).collect();
        assert_eq!(bad.len(), 2, "{loaded:?}");
        assert_eq!(bad[0].key, "d");
        assert!(bad[0].reason.contains("version 2"), "{}", bad[0].reason);
        assert_eq!(bad[1].key, "e");
        assert!(
            bad[1].reason.contains("unreadable owed_jobs record"),
            "{}",
            bad[1].reason
        );
        assert_eq!(
            ok[1].signed.signed().expect("signed").signature,
            vec![1, 2, 3]
        );
    }
}
