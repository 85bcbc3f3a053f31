//! Signed policy bundles (invariant 6 in ARCHITECTURE.md): M-of-N root signatures over the
//! whole bundle, a size limit checked before parsing, and rollback refusal.

use std::collections::BTreeSet;

use crate::crypto::{PublicKey, SigningKey, sha256_hex, verify};
use crate::policy::{Policy, PolicyErrors};

/// Largest accepted bundle; checked before anything else.
pub const MAX_BUNDLE_BYTES: usize = 1024 * 1024;

/// One root key's signature over a bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicySignature {
    /// [`PublicKey::fingerprint`] of the signing root key.
    pub key_id: String,
    pub signature: Vec<u8>,
}

/// Why a bundle was refused.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum BundleError {
    #[error("policy bundle of {size} bytes exceeds the limit of {max} bytes")]
    Oversized { size: usize, max: usize },
    #[error("policy bundle does not carry enough valid root signatures")]
    Signature,
    #[error("policy bundle is not valid UTF-8")]
    NotUtf8,
    #[error("policy bundle is invalid:\n{0}")]
    Invalid(PolicyErrors),
    #[error(
        "policy version {offered} is not newer than the current version {current} (rollback refused)"
    )]
    Rollback { current: u64, offered: u64 },
}

/// Signs a bundle with a root key.
pub fn sign_bundle(bundle: &[u8], key: &SigningKey) -> PolicySignature {
    PolicySignature {
        key_id: key.public_key().fingerprint(),
        signature: key.sign(bundle),
    }
}

/// Verifies that at least `threshold` distinct `roots` signed `bundle`
/// (a `threshold` of 0 is treated as 1), then parses it. Signatures by
/// unknown keys are ignored.
pub fn verify_bundle(
    bundle: &[u8],
    sigs: &[PolicySignature],
    roots: &[PublicKey],
    threshold: usize,
) -> Result<Policy, BundleError> {
    if bundle.len() > MAX_BUNDLE_BYTES {
        return Err(BundleError::Oversized {
            size: bundle.len(),
            max: MAX_BUNDLE_BYTES,
        });
    }
    let mut valid: BTreeSet<[u8; 32]> = BTreeSet::new();
    for sig in sigs {
        if let Some(root) = roots.iter().find(|r| r.fingerprint() == sig.key_id)
            && verify(root, bundle, &sig.signature)
        {
            valid.insert(*root.as_bytes());
        }
    }
    if valid.len() < threshold.max(1) {
        return Err(BundleError::Signature);
    }
    let text = std::str::from_utf8(bundle).map_err(|_| BundleError::NotUtf8)?;
    Policy::parse(text).map_err(BundleError::Invalid)
}

/// Refuses a policy whose version is not strictly greater than the current one.
pub fn check_rollback(current_version: Option<u64>, new: &Policy) -> Result<(), BundleError> {
    match current_version {
        Some(current) if new.version <= current => Err(BundleError::Rollback {
            current,
            offered: new.version,
        }),
        _ => Ok(()),
    }
}

/// `sha256:<hex>` of the bundle bytes, shown in `!policy` and `policy show`.
pub fn bundle_hash(bundle: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bundle))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::test_keys::key;

    const BUNDLE: &[u8] = b"version = 5\n[commands.uptime]\nargv = [\"/usr/bin/uptime\"]\n";

    fn roots() -> Vec<PublicKey> {
        vec![
            key(11).public_key(),
            key(12).public_key(),
            key(13).public_key(),
        ]
    }

    fn check(bundle: &[u8], signers: &[u8], threshold: usize, ok: bool) {
        let sigs: Vec<PolicySignature> = signers
            .iter()
            .map(|s| sign_bundle(bundle, &key(*s)))
            .collect();
        let got = verify_bundle(bundle, &sigs, &roots(), threshold);
        assert_eq!(
            got.is_ok(),
            ok,
            "signers {signers:?} threshold {threshold}: {got:?}"
        );
        if !ok {
            assert_eq!(got.err(), Some(BundleError::Signature));
        }
    }

    #[test]
    fn signatures_and_threshold() {
        check(BUNDLE, &[11], 1, true);
        check(BUNDLE, &[13], 1, true);
        check(BUNDLE, &[99], 1, false);
        check(BUNDLE, &[], 1, false);
        check(BUNDLE, &[], 0, false);
        check(BUNDLE, &[11, 12], 2, true);
        check(BUNDLE, &[11, 99, 13], 2, true);
        check(BUNDLE, &[11, 11], 2, false);
        check(BUNDLE, &[11, 99], 2, false);
        check(BUNDLE, &[11, 12, 13], 3, true);
    }

    #[test]
    fn tampered_and_oversized() {
        let sig = sign_bundle(BUNDLE, &key(11));
        let mut tampered = BUNDLE.to_vec();
        tampered[10] = b'9';
        assert_eq!(
            verify_bundle(&tampered, std::slice::from_ref(&sig), &roots(), 1).err(),
            Some(BundleError::Signature)
        );
        let mut forged = sig.clone();
        forged.key_id = key(12).public_key().fingerprint();
        assert_eq!(
            verify_bundle(BUNDLE, &[forged], &roots(), 1).err(),
            Some(BundleError::Signature)
        );
        let big = vec![b'#'; MAX_BUNDLE_BYTES + 1];
        assert!(matches!(
            verify_bundle(&big, &[], &roots(), 1),
            Err(BundleError::Oversized { .. })
        ));
        let bad = b"version = 0\n";
        let sig = sign_bundle(bad, &key(11));
        assert!(matches!(
            verify_bundle(bad, &[sig], &roots(), 1),
            Err(BundleError::Invalid(_))
        ));
        let not_utf8 = [0xffu8, 0xfe];
        let sig = sign_bundle(&not_utf8, &key(11));
        assert_eq!(
            verify_bundle(&not_utf8, &[sig], &roots(), 1).err(),
            Some(BundleError::NotUtf8)
        );
    }

    #[test]
    fn rollback_and_hash() {
        let p = verify_bundle(BUNDLE, &[sign_bundle(BUNDLE, &key(11))], &roots(), 1)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(check_rollback(None, &p), Ok(()));
        assert_eq!(check_rollback(Some(4), &p), Ok(()));
        assert_eq!(
            check_rollback(Some(5), &p),
            Err(BundleError::Rollback {
                current: 5,
                offered: 5
            })
        );
        assert_eq!(
            check_rollback(Some(6), &p),
            Err(BundleError::Rollback {
                current: 6,
                offered: 5
            })
        );
        assert_eq!(
            bundle_hash(b"abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
