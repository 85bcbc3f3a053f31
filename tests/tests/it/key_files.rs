//! Key files are never clobbered or written through: `fleetcmd policy
//! keygen` and `fleetcmd-controller issue-cert`, run as separate processes
//! the way an admin runs them, refuse an existing file (the policy root
//! key), and refuse a symlink, a device node or a FIFO even with `--force`.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::{Command, Output};

use fleetcmd_tests::workspace_bin as bin;

fn keygen(out: &Path, force: bool) -> Output {
    let mut c = Command::new(bin("fleetcmd"));
    c.args(["policy", "keygen", "--out"]).arg(out);
    if force {
        c.arg("--force");
    }
    c.output().expect("fleetcmd runs")
}

fn refused(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "should fail: {err}");
    assert!(err.contains(needle), "stderr should say {needle:?}: {err}");
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A node that is neither a file nor a symlink: a character device when
/// running as root (what `/dev/null` is), a FIFO otherwise.
fn special_node(dir: &Path) -> (std::path::PathBuf, &'static str) {
    let p = dir.join("null");
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let (cmd, kind): (Vec<&str>, _) = if root {
        (vec!["mknod", "-m", "0666"], "a device node")
    } else {
        (vec!["mkfifo"], "a FIFO")
    };
    let mut c = Command::new(cmd[0]);
    c.args(&cmd[1..]).arg(&p);
    if root {
        c.args(["c", "1", "3"]);
    }
    assert!(
        c.status().is_ok_and(|s| s.success()),
        "{cmd:?} {}",
        p.display()
    );
    (p, kind)
}

#[test]
fn keygen_never_overwrites_a_key_or_writes_through_a_link_or_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root_key = dir.path().join("admin.key");
    let first = keygen(&root_key, false);
    assert!(first.status.success(), "{first:?}");
    let original = read(&root_key);

    // Running it again with the same --out would have destroyed the root key.
    refused(&keygen(&root_key, false), "already exists");
    assert_eq!(read(&root_key), original);

    // A symlink planted at --out: not followed, not replaced, even forced.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "victim's data").expect("victim");
    let link = dir.path().join("link.key");
    std::os::unix::fs::symlink(&victim, &link).expect("symlink");
    for force in [false, true] {
        refused(&keygen(&link, force), "symbolic link");
    }
    assert_eq!(read(&victim), "victim's data");

    let (node, kind) = special_node(dir.path());
    for force in [false, true] {
        refused(&keygen(&node, force), kind);
    }
    let t = std::fs::symlink_metadata(&node).expect("node").file_type();
    assert!(t.is_char_device() || t.is_fifo(), "{t:?}");

    // --force replaces a regular file, atomically with mode 0600.
    let forced = keygen(&root_key, true);
    assert!(forced.status.success(), "{forced:?}");
    assert_ne!(read(&root_key), original);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&root_key).expect("key").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn issue_cert_writes_nothing_when_any_of_its_files_exists() {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = keygen(&dir.path().join("admin.key"), false);
    assert!(admin.status.success(), "{admin:?}");
    let public = String::from_utf8_lossy(&admin.stdout).trim().to_string();
    let cfg = dir.path().join("controller.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\npolicy_roots = [\"{public}\"]\n",
            dir.path().join("ctl").display()
        ),
    )
    .expect("config");
    let out = dir.path().join("issued");
    let issue = |force: bool| {
        let mut c = Command::new(bin("fleetcmd-controller"));
        c.arg("-c").arg(&cfg).args([
            "issue-cert",
            "--role",
            "operator",
            "--name",
            "alice",
            "--out",
        ]);
        c.arg(&out);
        if force {
            c.arg("--force");
        }
        c.output().expect("fleetcmd-controller runs")
    };
    std::fs::create_dir_all(&out).expect("out dir");
    // Only ca.crt is in the way: the key and certificate are not written either.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "victim's data").expect("victim");
    std::os::unix::fs::symlink(&victim, out.join("ca.crt")).expect("symlink");
    for force in [false, true] {
        refused(&issue(force), "symbolic link");
        assert!(!out.join("alice.key").exists() && !out.join("alice.crt").exists());
    }
    assert_eq!(read(&victim), "victim's data");
    std::fs::remove_file(out.join("ca.crt")).expect("unlink");
    // The operator's signing key is one of its files: in the way, it
    // stops everything too.
    std::os::unix::fs::symlink(&victim, out.join("alice.sign.key")).expect("symlink");
    for force in [false, true] {
        refused(&issue(force), "symbolic link");
        assert!(!out.join("alice.key").exists() && !out.join("ca.crt").exists());
    }
    assert_eq!(read(&victim), "victim's data");
    std::fs::remove_file(out.join("alice.sign.key")).expect("unlink");
    let ok = issue(false);
    assert!(ok.status.success(), "{ok:?}");
    let key = read(&out.join("alice.key"));
    // A P-256 TLS key, and an Ed25519 signing key whose public key is
    // printed and written for the policy.
    assert!(
        fleetcmd_core::crypto::SigningKey::from_pkcs8_pem(&key).is_err(),
        "the TLS key is not Ed25519"
    );
    let signing =
        fleetcmd_core::crypto::SigningKey::from_pkcs8_pem(&read(&out.join("alice.sign.key")))
            .expect("an Ed25519 signing key");
    let public = signing.public_key().to_string();
    assert_eq!(read(&out.join("alice.sign.pub")), format!("{public}\n"));
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains(&public),
        "{ok:?}"
    );
    refused(&issue(false), "already exists");
    assert_eq!(read(&out.join("alice.key")), key);
    let again = issue(true);
    assert!(again.status.success(), "{again:?}");
    assert_ne!(read(&out.join("alice.key")), key);
}
