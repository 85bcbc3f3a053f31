//! The packaged units use `Type=notify` with a watchdog (issue 8). systemd is
//! not PID 1 on the test machine, so the test plays systemd's part: it binds
//! the notification socket, starts the real `fleetcmd-controller` with
//! `NOTIFY_SOCKET` and `WATCHDOG_USEC` as systemd would, and reads what the
//! controller says: READY once it listens, WATCHDOG pings, STOPPING on TERM.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fleetcmd_tests::workspace_bin as bin;

#[test]
fn controller_notifies_ready_pings_the_watchdog_and_says_stopping() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let admin = fleetcmd_cli::policy_cmd::keygen(&dir.path().join("admin.key"))
        .map_err(|f| f.error)
        .expect("key");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let cfg = dir.path().join("controller.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\npolicy_roots = [\"{}\"]\n",
            dir.path().join("data").display(),
            admin.public_key()
        ),
    )
    .expect("config");
    // systemd sets WATCHDOG_PID to the main process: `exec` keeps the
    // shell's pid, so `$$` is the controller's.
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" -c \"$1\" run")
        .arg(bin("fleetcmd-controller"))
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("controller starts");
    let mut said = Vec::<String>::new();
    let mut buf = [0u8; 512];
    let start = Instant::now();
    let mut ready_at = None;
    while start.elapsed() < Duration::from_secs(20) {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.contains("READY=1") {
                ready_at.get_or_insert(Instant::now());
                // Ready means listening: the port accepts connections now.
                assert!(
                    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
                    "READY before listening"
                );
            }
            said.push(msg);
        }
        if said.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3 {
            break;
        }
    }
    assert!(ready_at.is_some(), "no READY=1 in {said:?}");
    assert!(
        said.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3,
        "watchdog pings missing: {said:?}"
    );
    // TERM, as `systemctl stop` sends it.
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline && !said.iter().any(|m| m.contains("STOPPING=1")) {
        if let Ok(n) = sock.recv(&mut buf) {
            said.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    assert!(
        said.iter().any(|m| m.contains("STOPPING=1")),
        "no STOPPING=1 in {said:?}"
    );
    let status = child.wait().expect("exits");
    assert!(status.success(), "clean exit after TERM: {status:?}");
}
