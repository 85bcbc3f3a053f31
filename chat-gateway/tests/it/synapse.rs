//! A real Synapse homeserver for the Matrix tests: installed from PyPI
//! (`matrix-synapse`, with `matrix-nio` for the human users) into a venv
//! cached under the target directory, started by each test on a free
//! loopback port with a throwaway sqlite database, client API only (no
//! federation listener, no key servers), rate limits relaxed, users
//! registered with the shared secret. When the venv cannot be made the
//! test fails with the command that installs what is missing.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::support::free_port;

/// The shared secret users are registered with.
pub(crate) const SHARED_SECRET: &str = "fleetcmd-test-registration-secret";
/// Longest wait for Synapse to answer after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// What the venv holds, from the checkout.
pub(crate) fn matrix_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/matrix")
}

/// A venv with `tests/it/matrix/requirements.txt` installed, cached in the
/// target directory (made again when the requirements change).
pub(crate) fn venv_python() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../matrix-venv");
    let python = venv.join("bin/python");
    let requirements = matrix_dir().join("requirements.txt");
    let wanted = std::fs::read_to_string(&requirements).expect("requirements.txt");
    let marker = venv.join("fleetcmd-requirements.txt");
    // Another test process may be making it: one at a time.
    let lock =
        std::fs::File::create(Path::new(env!("CARGO_TARGET_TMPDIR")).join("matrix-venv.lock"))
            .expect("venv lock file");
    lock.lock().expect("venv lock");
    if python.exists() && std::fs::read_to_string(&marker).ok().as_deref() == Some(&wanted) {
        return python;
    }
    let out = std::process::Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv)
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "python3 -m venv {} failed (apt-get install python3-venv python3-pip; scripts/test does): {}",
            venv.display(),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!(
            "python3 is not available ({e}): apt-get install python3 python3-venv python3-pip"
        ),
    }
    let out = std::process::Command::new(&python)
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
        "pip could not install {} (matrix-synapse, matrix-nio) from PyPI: {}",
        requirements.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&marker, wanted).expect("venv marker");
    python
}

/// A running Synapse in a temporary directory; stopped when dropped.
pub(crate) struct Synapse {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) url: String,
    pub(crate) python: PathBuf,
    child: Child,
}

impl Synapse {
    /// The server name users and rooms are on.
    pub(crate) const SERVER: &str = "localhost";

    pub(crate) async fn start() -> Synapse {
        let python = tokio::task::spawn_blocking(venv_python)
            .await
            .expect("venv");
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let d = dir.path().display();
        // A signing key in Synapse's own format (`--generate-keys` costs a
        // Python start of its own): algorithm, version, unpadded base64 seed.
        let mut seed = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .expect("random");
        use base64::Engine as _;
        let seed = base64::engine::general_purpose::STANDARD_NO_PAD.encode(seed);
        std::fs::write(
            dir.path().join("signing.key"),
            format!("ed25519 a_test {seed}\n"),
        )
        .expect("signing key");
        let config = format!(
            r#"server_name: "{server}"
pid_file: {d}/homeserver.pid
listeners:
  - port: {port}
    bind_addresses: ['127.0.0.1']
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client]
        compress: false
database:
  name: sqlite3
  args:
    database: {d}/homeserver.db
media_store_path: {d}/media
registration_shared_secret: "{SHARED_SECRET}"
report_stats: false
macaroon_secret_key: "test-macaroon-secret"
form_secret: "test-form-secret"
signing_key_path: {d}/signing.key
trusted_key_servers: []
suppress_key_server_warning: true
federation_domain_whitelist: []
enable_metrics: false
rc_message: {{per_second: 1000, burst_count: 1000}}
rc_login:
  address: {{per_second: 1000, burst_count: 1000}}
  account: {{per_second: 1000, burst_count: 1000}}
  failed_attempts: {{per_second: 1000, burst_count: 1000}}
rc_joins:
  local: {{per_second: 1000, burst_count: 1000}}
rc_invites:
  per_room: {{per_second: 1000, burst_count: 1000}}
  per_user: {{per_second: 1000, burst_count: 1000}}
"#,
            server = Self::SERVER
        );
        let cfg = dir.path().join("homeserver.yaml");
        std::fs::write(&cfg, config).expect("homeserver.yaml");
        let log = std::fs::File::create(dir.path().join("synapse.log")).expect("log file");
        let child = Command::new(&python)
            .args(["-m", "synapse.app.homeserver", "-c"])
            .arg(&cfg)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting synapse with {}: {e}", python.display()));
        let mut s = Synapse {
            dir,
            url: format!("http://127.0.0.1:{port}"),
            python,
            child,
        };
        s.wait_ready().await;
        s
    }

    async fn wait_ready(&mut self) {
        let versions = format!("{}/_matrix/client/versions", self.url);
        let tls = fleetcmd_gateway::adapters::public_tls_config("synapse probe").expect("tls");
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .build()
            .expect("http client");
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("synapse exited ({status}):\n{}", self.logs());
            }
            if let Ok(r) = http.get(&versions).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "synapse did not answer within {START_TIMEOUT:?}:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The end of Synapse's log, for failure messages.
    pub(crate) fn logs(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("synapse.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// `@name:localhost`.
    pub(crate) fn user_id(name: &str) -> String {
        format!("@{name}:{}", Self::SERVER)
    }
}
