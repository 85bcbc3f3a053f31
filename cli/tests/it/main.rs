//! The `fleetcmd` binary as a user runs it: the README's demo, operator
//! commands against a live fleet, policy tooling, exit codes.

mod human;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use fleetcmd_cli::fleet::{Fleet, FleetOptions};

const BIN: &str = env!("CARGO_BIN_EXE_fleetcmd");

fn run_with_stdin(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fleetcmd starts");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("fleetcmd finishes")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn readme_demo_prints_one_result_per_agent_and_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("fleet");
    let out = run_with_stdin(
        &[
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--data",
            data.to_str().expect("utf-8 path"),
        ],
        "!run uptime on all\n",
    );
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        text(&out.stderr)
    );
    assert!(stdout.contains("succeeded (3/3 ok)"), "{stdout}");
    for agent in ["dev-1", "dev-2", "dev-3"] {
        assert!(
            stdout.contains(&format!("{agent} — ok")),
            "{agent} missing:\n{stdout}"
        );
    }
    assert_eq!(stdout.matches("load average").count(), 3, "{stdout}");
    let env = std::fs::read_to_string(data.join("env")).expect("DIR/env written");
    for var in [
        "FLEETCMD_CONTROLLER=https://127.0.0.1:",
        "FLEETCMD_CA=",
        "FLEETCMD_CERT=",
        "FLEETCMD_KEY=",
    ] {
        assert!(
            env.contains(&format!("export {var}")),
            "{var} missing from env file:\n{env}"
        );
    }
}

/// Runs `fleetcmd` against a live fleet with the `DIR/env` variables.
fn fleetcmd(fleet: &Fleet, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("FLEETCMD_CONTROLLER", &fleet.url)
        .env("FLEETCMD_CA", fleet.dir.join("ca.crt"))
        .env("FLEETCMD_CERT", fleet.dir.join("operator.crt"))
        .env("FLEETCMD_KEY", fleet.dir.join("operator.key"))
        .stdin(Stdio::null())
        .output()
        .expect("fleetcmd runs")
}

#[test]
fn operator_commands_against_a_live_fleet() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = FleetOptions::new(dir.path());
    opts.heartbeat = Duration::from_secs(1);
    let fleet = rt.block_on(Fleet::start(opts)).expect("fleet");

    let out = fleetcmd(&fleet, &["agents"]);
    let s = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(s.matches("online").count(), 3, "{s}");

    let out = fleetcmd(&fleet, &["run", "echo", "hi there", "--on", "role=web"]);
    let s = text(&out.stdout);
    assert!(out.status.success(), "{s}{}", text(&out.stderr));
    assert!(
        s.contains("dev-1: hi there") && s.contains("dev-3: hi there") && !s.contains("dev-2"),
        "{s}"
    );

    // Any failed host makes the exit status non-zero.
    let out = fleetcmd(&fleet, &["run", "false", "--on", "all"]);
    let s = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{s}");
    assert!(s.contains("[failed: exit status 1]"), "{s}");

    // A bad argument is refused before anything is submitted.
    let out = fleetcmd(&fleet, &["run", "sleep", "99999", "--on", "all"]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("seconds"),
        "{}",
        text(&out.stderr)
    );

    let summary = s
        .lines()
        .find(|l| l.starts_with("job "))
        .expect("summary line");
    let id = summary
        .split_whitespace()
        .nth(1)
        .expect("job id in summary")
        .to_owned();
    // The summary shows the short id, and `job` takes it back.
    assert_eq!(id.len(), 12, "{summary}");
    let out = fleetcmd(&fleet, &["job", &id]);
    assert!(
        text(&out.stdout).contains("`false` on all: failed (0/3 ok)"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    let out = fleetcmd(
        &fleet,
        &[
            "token", "create", "--labels", "role=web", "--ttl", "10m", "--name", "web-9",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_string();
    assert!(token.starts_with("fct1_"), "{token}");
    // The hint joins with the token in the environment, never in argv.
    let hint = text(&out.stderr);
    assert!(
        hint.contains(&format!(
            "on the host: FLEETCMD_JOIN_TOKEN={token} fleetcmd-agent join --controller {} --name web-9\n",
            fleet.url
        )) && !hint.contains("--token"),
        "{hint}"
    );

    let out = fleetcmd(&fleet, &["policy", "show"]);
    assert!(
        text(&out.stdout).contains("version 1"),
        "{}",
        text(&out.stdout)
    );

    let out = fleetcmd(&fleet, &["agents", "revoke", "dev-2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = fleetcmd(&fleet, &["agents"]);
    assert!(
        text(&out.stdout)
            .lines()
            .any(|l| l.starts_with("dev-2") && l.contains("revoked")),
        "{}",
        text(&out.stdout)
    );

    rt.block_on(fleet.shutdown()).expect("shutdown");
}

#[test]
fn missing_operator_identity_is_a_usage_error() {
    let out = Command::new(BIN)
        .args(["agents"])
        .env_remove("FLEETCMD_CA")
        .env_remove("FLEETCMD_CERT")
        .env_remove("FLEETCMD_KEY")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(64));
    assert!(
        text(&out.stderr).contains("FLEETCMD_CA"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_timeout_under_one_second_is_refused_not_turned_into_the_default() {
    for (timeout, expected) in [
        (
            "500ms",
            "--timeout: must be at least 1s (a job's timeout is whole seconds), got 500ms",
        ),
        ("0s", "--timeout: must be at least 1s"),
        ("1500ms", "--timeout: must be whole seconds"),
    ] {
        let out = Command::new(BIN)
            .args(["run", "uptime", "--on", "all", "--timeout", timeout])
            .env_remove("FLEETCMD_CA")
            .env_remove("FLEETCMD_CERT")
            .env_remove("FLEETCMD_KEY")
            .output()
            .expect("runs");
        assert_eq!(out.status.code(), Some(64), "{timeout}");
        assert!(
            text(&out.stderr).contains(expected),
            "{timeout}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn policy_check_prints_every_error_with_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("policy.toml");
    std::fs::write(
        &file,
        "version = 1\n\n[commands.a]\nargv = [\"rel/path\"]\n\n[commands.b]\nargv = [\"/bin/echo\", \"{x}\"]\n\n[roles.r]\ncommands = [\"nope\"]\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["policy", "check", file.to_str().expect("utf-8")])
        .output()
        .expect("runs");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.lines().count() >= 3, "expected every error:\n{err}");
    assert!(
        err.contains("line 3") || err.contains("line 4"),
        "argv error with its line:\n{err}"
    );
    assert!(
        err.contains("line 6") || err.contains("line 7"),
        "placeholder error with its line:\n{err}"
    );
    assert!(
        err.contains("line 9") || err.contains("line 10"),
        "unknown command error with its line:\n{err}"
    );
}

#[test]
fn policy_keygen_sign_and_verify_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("admin.key");
    let out = Command::new(BIN)
        .args(["policy", "keygen", "--out", key.to_str().expect("utf-8")])
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let public = text(&out.stdout).trim().to_owned();
    let root = fleetcmd_core::crypto::PublicKey::parse(&public).expect("printed public key parses");
    let file = dir.path().join("policy.toml");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/policy.toml"),
        &file,
    )
    .expect("copy example");
    let out = Command::new(BIN)
        .args([
            "policy",
            "sign",
            file.to_str().expect("utf-8"),
            "--key",
            key.to_str().expect("utf-8"),
        ])
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let sigs = std::fs::read_to_string(dir.path().join("policy.toml.sig")).expect("sig file");
    let sigs = fleetcmd_cli::policy_cmd::decode_sigs(&sigs, &file)
        .map_err(|f| f.error)
        .expect("sig file parses");
    let bundle = std::fs::read(&file).expect("bundle");
    fleetcmd_core::policy_bundle::verify_bundle(&bundle, &sigs, &[root], 1)
        .expect("signature verifies with the printed key");
}
