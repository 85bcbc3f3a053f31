//! Job specs: `JobSpec::from_bytes` on arbitrary bytes, and
//! `SignedJob::verify` on arbitrary spec bytes that are either signed by the
//! policy's trusted key (so verification gets past the signature and parses
//! attacker-shaped JSON from a trusted signer) or carry a fuzzed signature.
#![no_main]

use std::sync::OnceLock;

use fleetcmd_core::crypto::SigningKey;
use fleetcmd_core::job::{CLOCK_SKEW_SECS, JobSpec, SignedJob};
use fleetcmd_core::policy::Policy;
use libfuzzer_sys::fuzz_target;

/// PKCS#8 v1 prefix for an Ed25519 private key; the fixed seed follows.
const PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

struct Fixture {
    key: SigningKey,
    policy: Policy,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let mut der = PKCS8_V1_PREFIX.to_vec();
        der.extend_from_slice(&[7u8; 32]);
        let key = SigningKey::from_pkcs8_der(&der).expect("fixed test key is valid");
        let text = format!(
            r#"
version = 1
[[signers]]
id = "gw"
public_key = "{}"
may_sign = ["uptime", "restart"]
vouches_for = ["slack:*", "irc:*", "console:*"]

[[signers]]
id = "ops"
public_key = "{}"
may_sign = ["*"]
vouches_for = ["cli:*"]

[commands.uptime]
argv = ["/usr/bin/uptime"]

[commands.restart]
argv = ["/usr/bin/systemctl", "restart", "{{unit}}"]
args.unit = {{ kind = "enum", values = ["nginx.service"] }}
"#,
            key.public_key(),
            key.public_key()
        );
        let policy = Policy::parse(&text).expect("the fuzz policy is valid");
        Fixture { key, policy }
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let (head, spec) = data.split_at(9);
    let mode = head[0];
    let now = u64::from_le_bytes(head[1..9].try_into().expect("8 bytes"));

    if let Ok(parsed) = JobSpec::from_bytes(spec) {
        let bytes = parsed.to_bytes();
        assert_eq!(
            JobSpec::from_bytes(&bytes).as_ref(),
            Ok(&parsed),
            "to_bytes round trip"
        );
    }

    let f = fixture();
    let key_id = if mode & 1 == 0 { "gw" } else { "ops" };
    let job = if mode & 2 == 0 {
        SignedJob {
            spec: spec.to_vec(),
            signature: f.key.sign(spec),
            key_id: key_id.to_string(),
        }
    } else {
        // Fuzzed signature (first 64 bytes) over the rest.
        let (sig, body) = spec.split_at(spec.len().min(64));
        SignedJob {
            spec: body.to_vec(),
            signature: sig.to_vec(),
            key_id: if mode & 4 == 0 {
                key_id.to_string()
            } else {
                String::from_utf8_lossy(body).into_owned()
            },
        }
    };
    if let Ok(ok) = job.verify(&f.policy, now) {
        assert!(mode & 2 == 0, "a fuzzed signature was accepted");
        assert!(key_id == "ops" || ok.command == "uptime" || ok.command == "restart");
        assert!(ok.not_before <= ok.expires_at);
        assert!(now.saturating_add(CLOCK_SKEW_SECS) >= ok.not_before);
        assert!(now <= ok.expires_at.saturating_add(CLOCK_SKEW_SECS));
    }
});
