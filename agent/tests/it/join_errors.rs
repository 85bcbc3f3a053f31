//! What `fleetcmd-agent join` says when it cannot join: each fact once.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_fleetcmd-agent");

/// Runs `join` with `token` and a config path in an empty directory (so
/// join would write a new config there); returns (exit code, stderr).
fn join_with(token: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(dir.path().join("agent.toml"))
        .args(["join", "--controller", "https://127.0.0.1:9", "--no-start"])
        .args(["--token", token])
        .env_remove("FLEETCMD_JOIN_TOKEN")
        .env_remove("FLEETCMD_AGENT_CONFIG")
        .output()
        .expect("fleetcmd-agent runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_bad_join_token_is_named_once() {
    let len = fleetcmd_core::join_token::TOKEN_LEN;
    for (token, expected) in [
        (
            "abc".to_string(),
            format!("fleetcmd-agent: join token must be {len} characters, got 3\n"),
        ),
        (
            "x".repeat(len),
            "fleetcmd-agent: join token must start with `".to_string(),
        ),
    ] {
        let (code, stderr) = join_with(&token);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.starts_with(&expected), "{stderr}");
        assert_eq!(stderr.matches("join token").count(), 1, "{stderr}");
    }
}
