//! The current policy: the last bundle pushed, verified against the policy
//! roots the controller was configured with (at push and again at start,
//! so a tampered database cannot smuggle a policy in).
//!
//! Owns the current policy and the roots that verify one. Knows nothing
//! about agents or the audit trail: `Shared::push_policy` audits, stores,
//! flushes and then sends the new policy to every agent.

use std::sync::{Arc, RwLock};

use fleetcmd_core::crypto::PublicKey;
use fleetcmd_core::policy::Policy;
use fleetcmd_core::policy_bundle::{self, PolicySignature};

use crate::error::{ApiError, ApiResult};
use crate::store::PolicyRecord;

pub struct CurrentPolicy {
    pub policy: Policy,
    pub record: PolicyRecord,
    pub hash: String,
}

pub struct Policies {
    current: RwLock<Option<Arc<CurrentPolicy>>>,
    roots: Vec<PublicKey>,
    threshold: usize,
}

impl Policies {
    /// No policy yet; bundles verify against `roots` (`threshold` of them).
    pub fn new(roots: Vec<PublicKey>, threshold: usize) -> Policies {
        Policies {
            current: RwLock::new(None),
            roots,
            threshold,
        }
    }

    pub fn current(&self) -> Option<Arc<CurrentPolicy>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Makes `cur` the current policy (after it was verified and stored).
    pub fn set(&self, cur: Arc<CurrentPolicy>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(cur);
    }

    pub fn verify(&self, record: PolicyRecord) -> ApiResult<CurrentPolicy> {
        let sigs: Vec<PolicySignature> = record
            .signatures
            .iter()
            .map(|(key_id, signature)| PolicySignature {
                key_id: key_id.clone(),
                signature: signature.clone(),
            })
            .collect();
        let policy =
            policy_bundle::verify_bundle(&record.bundle, &sigs, &self.roots, self.threshold)
                .map_err(|e| ApiError::InvalidArgument(format!("policy bundle refused: {e}")))?;
        let hash = policy_bundle::bundle_hash(&record.bundle);
        Ok(CurrentPolicy {
            policy,
            record,
            hash,
        })
    }
}
