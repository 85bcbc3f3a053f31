//! `fleetcmd init` as a newcomer runs it: what it writes and how, and what
//! it refuses (the whole README flow is `docs.rs`).

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

fn init(cwd: &Path, args: &[&str]) -> std::process::Output {
    Command::new(fleetcmd_tests::workspace_bin("fleetcmd"))
        .arg("init")
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("fleetcmd init runs")
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Every key is 0600 in a 0700 directory; the controller's directory (CA
/// key, database) is 0700 too.
#[test]
fn init_writes_every_secret_readable_by_its_owner_only() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = init(
        tmp.path(),
        &[
            "--dir",
            "fleet",
            "--operator",
            "alice",
            "--host",
            "web-1:role=web",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fleet = tmp.path().join("fleet");
    for dir in ["admin", "controller", "operator", "gateway", "hosts"] {
        assert_eq!(mode(&fleet.join(dir)), 0o700, "{dir}");
    }
    let mut keys = 0;
    let mut stack = vec![fleet.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let p = e.expect("entry").path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if p.is_dir() {
                stack.push(p.clone());
            } else if name.ends_with(".key") || name.ends_with(".join") {
                keys += 1;
                assert_eq!(mode(&p), 0o600, "{}", p.display());
            }
        }
    }
    // Root, CA, audit, operator TLS + signing, gateway TLS + signing, a join line.
    assert!(keys >= 8, "only {keys} secrets found");
    let join = std::fs::read_to_string(fleet.join("hosts/web-1.join")).expect("join line");
    assert!(
        join.starts_with(
            "fleetcmd-agent join --controller https://127.0.0.1:7443 --name web-1 --token fct1_"
        ),
        "{join}"
    );
}

/// A directory with anything in it is refused, and left as it was; a bad
/// flag is named, and nothing is written.
#[test]
fn init_refuses_a_used_directory_and_bad_flags_and_writes_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let used = tmp.path().join("used");
    std::fs::create_dir(&used).expect("dir");
    std::fs::write(used.join("notes.txt"), "mine").expect("file");
    let out = init(tmp.path(), &["--dir", "used"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not empty"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entries: Vec<_> = std::fs::read_dir(&used).expect("read").collect();
    assert_eq!(entries.len(), 1, "init wrote into a used directory");
    for (args, needle) in [
        (vec!["--host", "Web_1"], "--host \"Web_1\""),
        (vec!["--host", "web-1:role"], "labels"),
        (vec!["--url", "http://ctl:7443"], "https://"),
        (vec!["--operator", "../x"], "--operator"),
        (vec!["--chat", "irc"], "--irc-server"),
        (vec!["--chat", "slack"], "--chat \"slack\""),
        (vec!["--chat-admin", "nobody"], "--chat-admin"),
        (vec!["--token-ttl", "soon"], "--token-ttl"),
    ] {
        let mut all = vec!["--dir", "fresh"];
        all.extend(args.iter());
        let out = init(tmp.path(), &all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(
            !tmp.path().join("fresh").exists(),
            "{args:?} wrote something"
        );
    }
}
