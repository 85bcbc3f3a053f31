//! The API from another language: `examples/python/fleet.py` (grpcio,
//! gRPC-core/BoringSSL underneath, which cannot use Ed25519 TLS keys) run
//! against a fleet of the real binaries on loopback, as an operator with
//! the files `issue-cert` wrote. grpcio, grpcio-tools and cryptography
//! come from PyPI into a venv cached under the target directory; when pip
//! cannot install them the test fails and says so.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The example and what it needs, from the checkout.
fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python")
}

/// A venv with `examples/python/requirements.txt` installed, cached beside
/// the workspace binaries (reinstalled when the requirements change).
fn python_venv() -> PathBuf {
    let bins = fleetcmd_tests::workspace_bin("fleetcmd");
    let target = bins
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let venv = target.join("python-venv");
    let python = venv.join("bin/python");
    let requirements = example_dir().join("requirements.txt");
    let wanted = std::fs::read_to_string(&requirements).expect("requirements.txt");
    let marker = venv.join("fleetcmd-requirements.txt");
    if python.exists() && std::fs::read_to_string(&marker).ok().as_deref() == Some(&wanted) {
        return python;
    }
    let out = Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv)
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "python3 -m venv {} failed (install python3-venv: apt-get install python3-venv python3-pip; scripts/test does): {}",
            venv.display(),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!(
            "python3 is not available ({e}): apt-get install python3 python3-venv python3-pip (scripts/test does)"
        ),
    }
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--retries",
            "2",
            "--timeout",
            "30",
            "-r",
        ])
        .arg(&requirements)
        .stdin(Stdio::null())
        .output()
        .expect("pip runs");
    assert!(
        out.status.success(),
        "pip could not install {} from the package index (offline? this test needs PyPI): {}",
        requirements.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&marker, wanted).expect("venv marker");
    python
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn fleet_py(python: &Path, world: &crate::crash::World, args: &[&str]) -> Run {
    let op = world.dir.path().join("op");
    let out = tokio::process::Command::new(python)
        .arg(example_dir().join("fleet.py"))
        .args(args)
        .env("FLEETCMD_CONTROLLER", &world.url)
        .env("FLEETCMD_CA", op.join("ca.crt"))
        .env("FLEETCMD_CERT", op.join("admin.crt"))
        // No FLEETCMD_SIGNING_KEY: admin.sign.key beside admin.key, as
        // issue-cert wrote them.
        .env("FLEETCMD_KEY", op.join("admin.key"))
        .env_remove("FLEETCMD_SIGNING_KEY")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .expect("fleet.py finishes within 2 minutes")
        .expect("fleet.py runs");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_python_example_lists_agents_and_gets_a_signed_jobs_result() {
    let python = tokio::task::spawn_blocking(python_venv)
        .await
        .expect("venv");
    let (world, _controller, _agents) = crate::crash::setup().await;

    let agents = fleet_py(&python, &world, &["agents"]).await;
    assert_eq!(agents.code, Some(0), "{}{}", agents.stdout, agents.stderr);
    for name in ["a-1", "a-2"] {
        assert!(
            agents
                .stdout
                .lines()
                .any(|l| l.split_whitespace().take(2).eq([name, "online"])),
            "{name} online in:\n{}",
            agents.stdout
        );
    }

    let run = fleet_py(
        &python,
        &world,
        &["run", "echo", "text=hello from python", "--on", "all"],
    )
    .await;
    assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
    for name in ["a-1", "a-2"] {
        assert!(
            run.stdout.contains(&format!("{name}: ok exit 0\n"))
                && run.stdout.contains(&format!("{name}: hello from python\n")),
            "{name}'s result in:\n{}",
            run.stdout
        );
    }
    let id = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("job ")?.strip_suffix(": succeeded"))
        .unwrap_or_else(|| panic!("a succeeded job in:\n{}", run.stdout))
        .to_owned();
    // The controller has it as the operator's signed job.
    let job = world.job(&id).await.expect("the job is stored");
    assert_eq!(
        (
            job.state.as_str(),
            job.requester.as_str(),
            job.command.as_str()
        ),
        ("succeeded", "cli:admin", "echo"),
        "{job:?}"
    );

    let audit = fleet_py(&python, &world, &["audit", "--job", &id]).await;
    assert_eq!(audit.code, Some(0), "{}{}", audit.stdout, audit.stderr);
    let submitted: serde_json::Value = audit
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON record"))
        .find(|r| r["event"]["kind"] == "job_submitted")
        .unwrap_or_else(|| panic!("job_submitted in:\n{}", audit.stdout));
    assert_eq!(submitted["event"]["actor"], "cli:admin", "{submitted}");
    assert_eq!(
        submitted["event"]["fields"]["key_id"], "operator-dev",
        "{submitted}"
    );

    // Bad input is named, and nothing is submitted.
    let bad = fleet_py(&python, &world, &["run", "echo", "hello"]).await;
    assert_eq!(bad.code, Some(64), "{}{}", bad.stdout, bad.stderr);
    assert!(
        bad.stderr.contains("argument 'hello': expected NAME=VALUE"),
        "{}",
        bad.stderr
    );
}
