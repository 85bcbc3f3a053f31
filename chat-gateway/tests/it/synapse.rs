//! A real Synapse homeserver for the Matrix tests: installed from PyPI
//! (`matrix-synapse`, with `matrix-nio` for the human users) into a venv
//! cached under the target directory, started by each test on a free
//! loopback port with a throwaway sqlite database, client API only (no
//! federation listener, no key servers), rate limits relaxed, users
//! registered with the shared secret. When the venv cannot be made the
//! test fails with the command that installs what is missing. The humans
//! are matrix-nio clients ([`User`]: `matrix/user.py`, driven line by line
//! over stdin/stdout).
//!
//! Shared by the gateway's Matrix tests and the workspace's test of two
//! gateway processes on one room (`tests/tests/it/main.rs` includes this
//! file by path), so it depends on nothing but std, tokio, tempfile,
//! serde_json, ring and base64, and finds its files from the workspace
//! root, not from the crate that includes it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// The shared secret users are registered with.
pub(crate) const SHARED_SECRET: &str = "fleetcmd-test-registration-secret";
/// Longest wait for Synapse to answer after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// One expected message, in seconds (for user.py).
pub(crate) const WAIT_SECS: u64 = 20;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// What the venv holds and `user.py`, from the checkout. Both crates that
/// include this file sit one level below the workspace root.
pub(crate) fn matrix_dir() -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = crate_dir.parent().expect("the workspace root");
    root.join("chat-gateway/tests/it/matrix")
}

/// A venv with `matrix/requirements.txt` installed, cached in the target
/// directory (one for every test binary of the workspace; made again when
/// the requirements change).
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
    port: u16,
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
            port,
            child,
        };
        s.wait_ready().await;
        s
    }

    async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("synapse exited ({status}):\n{}", self.logs());
            }
            if self.answers().await {
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

    /// Whether the client API answers `GET /_matrix/client/versions` with
    /// 200 (plain HTTP/1.1 on loopback: no HTTP client needed).
    async fn answers(&self) -> bool {
        let probe = async {
            let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
            conn.write_all(
                b"GET /_matrix/client/versions HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n",
            )
            .await?;
            let mut answer = Vec::new();
            conn.read_to_end(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        };
        match tokio::time::timeout(Duration::from_secs(5), probe).await {
            Ok(Ok(answer)) => answer.starts_with(b"HTTP/1.1 200"),
            _ => false,
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

/// One matrix-nio client: `matrix/user.py` in a process of its own,
/// answering one JSON line per request.
pub(crate) struct User {
    pub(crate) id: String,
    _child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl User {
    pub(crate) async fn spawn(hs: &Synapse) -> User {
        let mut child = Command::new(&hs.python)
            .arg(matrix_dir().join("user.py"))
            .args([&hs.url, SHARED_SECRET])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("user.py: {e}"));
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        User {
            id: String::new(),
            _child: child,
            stdin,
            stdout,
        }
    }

    pub(crate) async fn ask(&mut self, req: Value) -> Value {
        let mut line = req.to_string();
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .await
            .expect("to user.py");
        let answer = self
            .stdout
            .next_line()
            .await
            .expect("from user.py")
            .unwrap_or_else(|| panic!("user.py ended at {req}"));
        let v: Value = serde_json::from_str(&answer).expect("user.py answers JSON");
        match v.get("ok") {
            Some(ok) => ok.clone(),
            None => panic!("user.py {req}: {v}"),
        }
    }

    /// Registers every name in `names` (password `pw-NAME`).
    pub(crate) async fn register(&mut self, names: &[&str]) {
        for n in names {
            self.ask(json!({"op": "register", "user": n, "password": format!("pw-{n}")}))
                .await;
        }
    }

    pub(crate) async fn login(hs: &Synapse, name: &str) -> User {
        let mut u = User::spawn(hs).await;
        let id = u
            .ask(json!({"op": "login", "user": name, "password": format!("pw-{name}")}))
            .await;
        u.id = id.as_str().unwrap_or_default().to_string();
        u
    }

    pub(crate) async fn create_room(
        &mut self,
        alias: &str,
        encrypted: bool,
        invite: &[String],
    ) -> String {
        let v = self
            .ask(json!({"op": "create_room", "alias": alias, "encrypted": encrypted, "invite": invite}))
            .await;
        v.as_str().unwrap_or_default().to_string()
    }

    pub(crate) async fn join(&mut self, room: &str) {
        self.ask(json!({"op": "join", "room": room})).await;
    }

    pub(crate) async fn say(&mut self, room: &str, text: &str) -> String {
        let v = self
            .ask(json!({"op": "say", "room": room, "text": text}))
            .await;
        v.as_str().unwrap_or_default().to_string()
    }

    pub(crate) async fn react(&mut self, room: &str, event: &str, key: &str) {
        self.ask(json!({"op": "react", "room": room, "event_id": event, "key": key}))
            .await;
    }

    /// The first event from the bot in `room` whose text (or edited text)
    /// contains `needle`.
    pub(crate) async fn bot_said(&mut self, room: &str, needle: &str) -> Value {
        self.ask(
            json!({"op": "wait", "room": room, "sender": Synapse::user_id("bot"),
                        "contains": needle, "timeout": WAIT_SECS}),
        )
        .await
    }

    pub(crate) async fn everything_bot_said(&mut self, room: &str) -> Vec<Value> {
        let v = self
            .ask(json!({"op": "events", "room": room, "sender": Synapse::user_id("bot")}))
            .await;
        v.as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["type"] == "m.room.message")
            .cloned()
            .collect()
    }
}

/// The text of a message event, or of the edit it carries.
pub(crate) fn text_of(ev: &Value) -> String {
    let c = &ev["content"];
    c["m.new_content"]["body"]
        .as_str()
        .or(c["body"].as_str())
        .unwrap_or_default()
        .to_string()
}
