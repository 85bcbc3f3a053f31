//! Job specs and their signatures (invariant 4 in ARCHITECTURE.md). The signature covers the
//! exact serialized bytes, which travel with it, so no canonicalization is
//! needed; agents parse the bytes only after the signature checks out.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::approval::Approval;
use crate::authorize::Refusal;
use crate::crypto::{SigningKey, verify};
use crate::ids::{Identity, JobId};
use crate::policy::Policy;

/// Largest accepted serialized spec; checked before parsing.
pub const MAX_SPEC_BYTES: usize = 64 * 1024;
/// Clock skew tolerated between signer and agent.
pub const CLOCK_SKEW_SECS: u64 = 60;
/// Default lifetime of a job spec (`expires_at - not_before`).
pub const DEFAULT_EXPIRY_SECS: u64 = 600;

/// What was asked, by whom, where and until when.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub id: JobId,
    pub command: String,
    pub args: BTreeMap<String, String>,
    pub selector: String,
    pub requester: Identity,
    pub channel: String,
    /// Signed approvals (see [`crate::approval`]); not part of
    /// [`JobSpec::approval_digest`], which they sign.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<Approval>,
    /// The bare approver list of signers before approvals were evidence.
    /// Still parsed so their jobs are read, and never counted.
    #[serde(default, rename = "approvers", skip_serializing_if = "Vec::is_empty")]
    pub unattested_approvers: Vec<Identity>,
    pub timeout_secs: u64,
    /// Unix seconds.
    pub not_before: u64,
    /// Unix seconds.
    pub expires_at: u64,
    /// How the controller rolls the job out; signed with the rest, so it
    /// cannot be loosened on the way (absent = the defaults of [`Rollout`]).
    #[serde(default, skip_serializing_if = "Rollout::is_default")]
    pub rollout: Rollout,
}

/// Rate control: at most `batch` targets running at once
/// (default 50), stop starting new ones once more than `max_errors` failed
/// (default 0 for commands that need approval, unlimited otherwise), and run
/// `canary` targets first, going on only if they all succeed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<crate::grammar::Limit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_errors: Option<crate::grammar::Limit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<u32>,
}

/// Default `batch`.
pub const DEFAULT_BATCH: u32 = 50;

impl Rollout {
    pub fn is_default(&self) -> bool {
        *self == Rollout::default()
    }

    /// Targets that may run at once, out of `total`.
    pub fn batch_of(&self, total: u32) -> u32 {
        self.batch.map_or(DEFAULT_BATCH, |b| b.of(total)).max(1)
    }

    /// Failures tolerated before the job is aborted (`None` = unlimited).
    pub fn max_errors_of(&self, total: u32, needs_approval: bool) -> Option<u32> {
        match self.max_errors {
            Some(l) => Some(match l {
                crate::grammar::Limit::Count(n) => n,
                // A percentage of 100 tolerates every failure.
                crate::grammar::Limit::Percent(p) => (u64::from(total) * u64::from(p) / 100) as u32,
            }),
            None if needs_approval => Some(0),
            None => None,
        }
    }
}

/// Why spec bytes could not be read.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum JobError {
    #[error("job spec of {size} bytes exceeds the limit of {max} bytes")]
    Oversized { size: usize, max: usize },
    #[error("malformed job spec: {0}")]
    Malformed(String),
}

impl JobSpec {
    /// The JSON bytes that get signed.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a JobSpec of strings and integers always serializes")
    }

    /// SHA-256 of the spec without its approvals: what each approval signs,
    /// so an approval holds for exactly this job (id, command, arguments,
    /// targets, requester, channel, validity and rollout).
    pub fn approval_digest(&self) -> [u8; 32] {
        let mut bare = self.clone();
        bare.approvals.clear();
        bare.unattested_approvers.clear();
        crate::crypto::sha256(&bare.to_bytes())
    }

    /// Parses spec bytes; the size limit is checked before parsing.
    pub fn from_bytes(b: &[u8]) -> Result<JobSpec, JobError> {
        if b.len() > MAX_SPEC_BYTES {
            return Err(JobError::Oversized {
                size: b.len(),
                max: MAX_SPEC_BYTES,
            });
        }
        serde_json::from_slice(b).map_err(|e| JobError::Malformed(e.to_string()))
    }

    /// The well-formed job id of spec bytes that do not parse as a whole
    /// (a malformed requester, say), to answer the refusal under the job it
    /// belongs to. Nothing else of such bytes is read, and the id is only a
    /// label: it authorises nothing.
    pub fn id_of_unparsed(b: &[u8]) -> Option<String> {
        #[derive(Deserialize)]
        struct IdOnly {
            id: String,
        }
        if b.len() > MAX_SPEC_BYTES {
            return None;
        }
        let only: IdOnly = serde_json::from_slice(b).ok()?;
        JobId::parse(&only.id).ok().map(|id| id.to_string())
    }
}

/// Spec bytes with the signature over exactly those bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct SignedJob {
    pub spec: Vec<u8>,
    pub signature: Vec<u8>,
    /// The signer id in the policy's `[[signers]]`.
    pub key_id: String,
}

impl SignedJob {
    /// Serializes and signs `spec`.
    pub fn sign(spec: &JobSpec, key_id: &str, key: &SigningKey) -> SignedJob {
        let bytes = spec.to_bytes();
        let signature = key.sign(&bytes);
        SignedJob {
            spec: bytes,
            signature,
            key_id: key_id.to_string(),
        }
    }

    /// Checks, in order: size; the signer `key_id` exists in `policy`; the
    /// signature is valid for its key; then parses the spec; the signer may
    /// sign the spec's command; its validity window (`expires_at -
    /// not_before`) is at most the policy's `max_job_lifetime`; then time: refused if
    /// `now + CLOCK_SKEW_SECS < not_before` or `now > expires_at + CLOCK_SKEW_SECS`.
    /// Returns the parsed spec.
    pub fn verify(&self, policy: &Policy, now: u64) -> Result<JobSpec, Refusal> {
        if self.spec.len() > MAX_SPEC_BYTES {
            return Err(Refusal::Oversized {
                size: self.spec.len(),
            });
        }
        let signer = policy
            .signer(&self.key_id)
            .ok_or_else(|| Refusal::UnknownSigner(self.key_id.chars().take(100).collect()))?;
        if !verify(&signer.public_key, &self.spec, &self.signature) {
            return Err(Refusal::BadSignature);
        }
        // The command name lives in the spec, so it is parsed (only now that
        // the bytes are known to come from a trusted signer) before may_sign.
        let spec = JobSpec::from_bytes(&self.spec).map_err(|e| match e {
            JobError::Oversized { size, .. } => Refusal::Oversized { size },
            JobError::Malformed(m) => Refusal::Malformed(m),
        })?;
        if !signer.may_sign(&spec.command) {
            return Err(Refusal::SignerMayNotSign {
                signer: signer.id.clone(),
                command: spec.command.clone(),
            });
        }
        // A signer speaks only for the identities it owns: an operator's key
        // for that operator, a gateway's for the chat users it verifies. So a
        // key (stolen, or another operator's) cannot ask in someone else's name.
        if !signer.vouches_for(&spec.requester) {
            return Err(Refusal::SignerMayNotVouch {
                signer: signer.id.clone(),
                requester: spec.requester.to_string(),
            });
        }
        if spec.expires_at < spec.not_before {
            return Err(Refusal::Malformed(
                "expires_at is before not_before".to_string(),
            ));
        }
        let lifetime = spec.expires_at - spec.not_before;
        if lifetime > policy.max_job_lifetime.as_secs() {
            return Err(Refusal::LifetimeTooLong {
                lifetime,
                max: policy.max_job_lifetime.as_secs(),
            });
        }
        if now.saturating_add(CLOCK_SKEW_SECS) < spec.not_before {
            return Err(Refusal::NotYetValid);
        }
        if now > spec.expires_at.saturating_add(CLOCK_SKEW_SECS) {
            return Err(Refusal::Expired);
        }
        Ok(spec)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crypto::test_keys::key;

    pub(crate) const NOW: u64 = 1_800_000_000;
    pub(crate) const JOB_ID: &str = "01890a5d-ac96-774b-bcce-b302099a8057";

    pub(crate) fn policy_text(signer_pk: &str, may_sign: &str) -> String {
        format!(
            r#"
version = 3

[[signers]]
id = "gw"
public_key = "{signer_pk}"
may_sign = [{may_sign}]
vouches_for = ["slack:T0001:*"]

[commands.uptime]
argv = ["/usr/bin/uptime"]

[commands.restart]
argv = ["/usr/bin/systemctl", "restart", "{{unit}}"]
args.unit = {{ kind = "enum", values = ["nginx.service", "app.service"] }}
timeout = "2m"
targets = "role in (web,api)"
requires_approvals = 2

[roles.ops]
commands = ["*"]

[[bindings]]
subjects = ["slack:T0001:*"]
roles = ["ops"]

[approvers]
restart = ["slack:T0001:U1", "slack:T0001:U2", "slack:T0001:U3"]
"#
        )
    }

    pub(crate) fn policy() -> Policy {
        let text = policy_text(&key(1).public_key().to_string(), "\"*\"");
        Policy::parse(&text).unwrap_or_else(|e| panic!("{e}"))
    }

    pub(crate) fn spec(command: &str) -> JobSpec {
        JobSpec {
            id: JobId::parse(JOB_ID).unwrap_or_else(|e| panic!("{e}")),
            command: command.to_string(),
            args: BTreeMap::new(),
            selector: "all".to_string(),
            requester: Identity::parse("slack:T0001:U1").unwrap_or_else(|e| panic!("{e}")),
            channel: "slack:T0001:C1".to_string(),
            approvals: Vec::new(),
            unattested_approvers: Vec::new(),
            timeout_secs: 0,
            not_before: NOW,
            expires_at: NOW + DEFAULT_EXPIRY_SECS,
            rollout: Rollout::default(),
        }
    }

    fn check(job: &SignedJob, policy: &Policy, now: u64, expected: Result<(), Refusal>) {
        assert_eq!(job.verify(policy, now).map(|_| ()), expected, "now={now}");
    }

    #[test]
    fn round_trip_and_limits() {
        let s = spec("uptime");
        assert_eq!(JobSpec::from_bytes(&s.to_bytes()), Ok(s.clone()));
        let big = vec![b' '; MAX_SPEC_BYTES + 1];
        assert!(matches!(
            JobSpec::from_bytes(&big),
            Err(JobError::Oversized { .. })
        ));
        let mut v: serde_json::Value = serde_json::from_slice(&s.to_bytes()).unwrap_or_default();
        v["extra"] = serde_json::Value::Bool(true);
        assert!(JobSpec::from_bytes(v.to_string().as_bytes()).is_err());
        v["extra"] = serde_json::Value::Null;
        assert!(JobSpec::from_bytes(b"{}").is_err());
    }

    #[test]
    fn verify_table() {
        let p = policy();
        let good = SignedJob::sign(&spec("uptime"), "gw", &key(1));
        check(&good, &p, NOW, Ok(()));
        check(&good, &p, NOW - CLOCK_SKEW_SECS, Ok(()));
        check(
            &good,
            &p,
            NOW - CLOCK_SKEW_SECS - 1,
            Err(Refusal::NotYetValid),
        );
        check(
            &good,
            &p,
            NOW + DEFAULT_EXPIRY_SECS + CLOCK_SKEW_SECS,
            Ok(()),
        );
        check(
            &good,
            &p,
            NOW + DEFAULT_EXPIRY_SECS + CLOCK_SKEW_SECS + 1,
            Err(Refusal::Expired),
        );

        let mut tampered = good.clone();
        let i = tampered.spec.len() / 2;
        tampered.spec[i] ^= 1;
        check(&tampered, &p, NOW, Err(Refusal::BadSignature));

        let wrong_key = SignedJob::sign(&spec("uptime"), "gw", &key(2));
        check(&wrong_key, &p, NOW, Err(Refusal::BadSignature));

        let unknown = SignedJob::sign(&spec("uptime"), "other", &key(1));
        check(
            &unknown,
            &p,
            NOW,
            Err(Refusal::UnknownSigner("other".to_string())),
        );

        let oversized = SignedJob {
            spec: vec![b' '; MAX_SPEC_BYTES + 1],
            ..good.clone()
        };
        check(
            &oversized,
            &p,
            NOW,
            Err(Refusal::Oversized {
                size: MAX_SPEC_BYTES + 1,
            }),
        );

        let garbage = SignedJob {
            spec: b"not json".to_vec(),
            signature: key(1).sign(b"not json"),
            key_id: "gw".into(),
        };
        assert!(matches!(
            garbage.verify(&p, NOW),
            Err(Refusal::Malformed(_))
        ));

        let mut backwards = spec("uptime");
        backwards.expires_at = backwards.not_before - 1;
        let backwards = SignedJob::sign(&backwards, "gw", &key(1));
        assert!(matches!(
            backwards.verify(&p, NOW),
            Err(Refusal::Malformed(_))
        ));
    }

    #[test]
    fn lifetime_beyond_max_job_lifetime_is_refused() {
        let mut p = policy();
        assert_eq!(
            p.max_job_lifetime,
            crate::policy::defaults::MAX_JOB_LIFETIME
        );
        let day = 24 * 3600;
        let ten_years = 10 * 365 * day;
        for (lifetime, max, expected) in [
            (day, day, Ok(())),
            (
                day + 1,
                day,
                Err(Refusal::LifetimeTooLong {
                    lifetime: day + 1,
                    max: day,
                }),
            ),
            (
                ten_years,
                day,
                Err(Refusal::LifetimeTooLong {
                    lifetime: ten_years,
                    max: day,
                }),
            ),
            (600, 600, Ok(())),
            (
                601,
                600,
                Err(Refusal::LifetimeTooLong {
                    lifetime: 601,
                    max: 600,
                }),
            ),
        ] {
            p.max_job_lifetime = std::time::Duration::from_secs(max);
            let mut s = spec("uptime");
            s.expires_at = s.not_before + lifetime;
            check(&SignedJob::sign(&s, "gw", &key(1)), &p, NOW, expected);
        }
    }

    #[test]
    fn a_signer_signs_only_in_the_name_of_identities_it_vouches_for() {
        let p = policy();
        let mut s = spec("uptime");
        s.requester = Identity::parse("cli:bob").unwrap_or_else(|e| panic!("{e}"));
        check(
            &SignedJob::sign(&s, "gw", &key(1)),
            &p,
            NOW,
            Err(Refusal::SignerMayNotVouch {
                signer: "gw".into(),
                requester: "cli:bob".into(),
            }),
        );
    }

    #[test]
    fn may_sign_is_enforced() {
        let text = policy_text(&key(1).public_key().to_string(), "\"uptime\"");
        let p = Policy::parse(&text).unwrap_or_else(|e| panic!("{e}"));
        check(
            &SignedJob::sign(&spec("uptime"), "gw", &key(1)),
            &p,
            NOW,
            Ok(()),
        );
        check(
            &SignedJob::sign(&spec("restart"), "gw", &key(1)),
            &p,
            NOW,
            Err(Refusal::SignerMayNotSign {
                signer: "gw".into(),
                command: "restart".into(),
            }),
        );
    }
}
