//! Loading `gateway.toml` and the files it names.

use std::path::Path;

use base64::Engine;
use fleetcmd_gateway::config::{ConfigError, GatewayConfig};

const ROOT: &str = "ed25519:MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=";

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap_or_else(|e| panic!("{name}: {e}"));
}

fn fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let ck = rcgen::generate_simple_self_signed(vec!["gateway".to_string()])
        .unwrap_or_else(|e| panic!("{e}"));
    write(dir.path(), "ca.pem", &ck.cert.pem());
    write(dir.path(), "cert.pem", &ck.cert.pem());
    write(dir.path(), "key.pem", &ck.signing_key.serialize_pem());
    let rng = ring::rand::SystemRandom::new();
    let der =
        ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap_or_else(|e| panic!("{e}"));
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(der.as_ref())
    );
    write(dir.path(), "sign.pem", &pem);
    dir
}

fn config(signing_key: &str, cert: &str) -> String {
    format!(
        "controller = \"127.0.0.1:7443\"\nca = \"ca.pem\"\ncert = \"{cert}\"\nkey = \"key.pem\"\n\
         signing_key = \"{signing_key}\"\nsigner_id = \"gw\"\npolicy_roots = [\"{ROOT}\"]\nbot_name = \"opsbot\"\n\
         [console]\nenabled = true\n"
    )
}

#[test]
fn loads_options_with_paths_relative_to_the_file() {
    let dir = fixture();
    let file = dir.path().join("gateway.toml");
    write(dir.path(), "gateway.toml", &config("sign.pem", "cert.pem"));
    let opts = GatewayConfig::load(&file)
        .and_then(|c| c.options(&file))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (opts.signer_id.as_str(), opts.bot_name.as_str()),
        ("gw", "opsbot")
    );
    assert_eq!(opts.policy_roots.len(), 1);
    assert_eq!(opts.policy_threshold, 1);
    assert_eq!(opts.job_expiry.as_secs(), 600);
    assert_eq!(opts.poll_interval.as_millis(), 100);
    assert!(
        !format!("{opts:?}").contains("PRIVATE KEY"),
        "key material must not be in Debug"
    );
}

#[test]
fn file_problems_are_all_reported_with_file_and_key() {
    let dir = fixture();
    write(
        dir.path(),
        "bad-sign.pem",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    );
    let file = dir.path().join("gateway.toml");
    write(
        dir.path(),
        "gateway.toml",
        &config("bad-sign.pem", "missing.pem"),
    );
    let err = GatewayConfig::load(&file)
        .and_then(|c| c.options(&file))
        .err();
    let Some(ConfigError::Invalid { file: f, problems }) = err else {
        panic!("expected invalid: {err:?}")
    };
    assert_eq!(f, file);
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["cert", "signing_key"], "{problems:?}");
    assert!(problems[0].message.contains("missing.pem"), "{problems:?}");
}
