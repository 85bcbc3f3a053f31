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

/// `fleetcmd init` with `umask` set first, as a shell would.
fn init_with_umask(cwd: &Path, umask: &str, args: &[&str]) -> std::process::Output {
    Command::new("sh")
        .args(["-c", &format!("umask {umask} && exec \"$0\" init \"$@\"")])
        .arg(fleetcmd_tests::workspace_bin("fleetcmd"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("fleetcmd init runs")
}

/// The mode init gives `rel` (a path under the fleet's directory).
fn expected_mode(rel: &Path, is_dir: bool) -> u32 {
    let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let top = rel.components().count() == 1;
    match (is_dir, name) {
        (true, _) if rel.starts_with("controller") => 0o700,
        (true, _) if top => 0o700,
        (true, _) => panic!("init made a directory {} nobody expected", rel.display()),
        // The controller's own database files: its business, but never
        // readable by anyone else.
        (false, _) if rel.starts_with("controller/data") => 0o600,
        (false, n) if n.ends_with(".key") || n.ends_with(".join") || n.ends_with(".env") => 0o600,
        (false, n)
            if [".toml", ".sig", ".crt", ".pub"]
                .iter()
                .any(|ext| n.ends_with(ext)) =>
        {
            0o644
        }
        (false, _) => panic!("init wrote {} nobody expected", rel.display()),
    }
}

/// Under `umask 000`, every key, join line and env file is 0600, every
/// config, policy and certificate 0644, every directory but the fleet's own
/// (0755) is 0700: the modes are init's, not the umask's.
#[test]
fn init_writes_every_file_with_its_own_mode_whatever_the_umask() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = init_with_umask(
        tmp.path(),
        "000",
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
    assert_eq!(mode(&fleet), 0o755);
    let mut secrets = 0;
    let mut public = 0;
    let mut stack = vec![fleet.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let p = e.expect("entry").path();
            let rel = p.strip_prefix(&fleet).expect("under the fleet");
            let meta = std::fs::symlink_metadata(&p).expect("stat");
            assert!(!meta.file_type().is_symlink(), "{}", rel.display());
            let want = expected_mode(rel, meta.is_dir());
            assert_eq!(mode(&p), want, "{}: mode {:o}", rel.display(), mode(&p));
            if meta.is_dir() {
                stack.push(p.clone());
            } else if want == 0o600 && !rel.starts_with("controller/data") {
                secrets += 1;
            } else if want == 0o644 {
                public += 1;
            }
        }
    }
    // Root key, operator TLS + signing key + env, gateway TLS + signing
    // key, a join line; policy + signature, two configs, certificates.
    assert!(secrets >= 7, "only {secrets} secrets found");
    assert!(public >= 8, "only {public} public files found");
    let join = std::fs::read_to_string(fleet.join("hosts/web-1.join")).expect("join line");
    assert!(
        join.starts_with("FLEETCMD_JOIN_TOKEN=fct1_")
            && join.ends_with(
                " fleetcmd-agent join --controller https://127.0.0.1:7443 --name web-1\n"
            ),
        "{join}"
    );
    // The closing text names each host's file and how to run it.
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!(
            "web-1: copy {}/hosts/web-1.join there, then: sh web-1.join",
            fleet.canonicalize().expect("canonical").display()
        )),
        "{said}"
    );
}

/// A `--dir` someone else could change is refused before anything is
/// written, naming the directory, the problem and what to do; so is a
/// dangling symlink (it said only "File exists (os error 17)").
#[test]
fn init_refuses_a_directory_others_could_change_and_a_dangling_symlink() {
    use std::os::unix::fs::MetadataExt as _;
    let tmp = tempfile::tempdir().expect("tempdir");
    let mkdir = |name: &str, mode: u32| {
        let p = tmp.path().join(name);
        std::fs::create_dir(&p).expect("dir");
        // Exactly `mode`, whatever the umask.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        p
    };
    let open = mkdir("open", 0o777);
    let theirs = mkdir("theirs", 0o755);
    // The tests run as root; nobody is another user.
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534))
        .expect("chown to nobody (the tests run as root)");
    assert_eq!(std::fs::metadata(&theirs).expect("stat").uid(), 65534);
    let dangling = tmp.path().join("dl");
    std::os::unix::fs::symlink(tmp.path().join("nowhere"), &dangling).expect("symlink");
    for (dir, needles) in [
        (
            "open",
            vec![
                "--dir open",
                "writable by group or others (mode 777)",
                "chmod 0755",
            ],
        ),
        (
            "theirs",
            vec![
                "--dir theirs",
                "owned by uid 65534",
                "a directory of your own",
            ],
        ),
        (
            "dl",
            vec!["--dir dl", "a symlink to", "nowhere", "does not exist"],
        ),
    ] {
        let out = init(tmp.path(), &["--dir", dir]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{dir}: {err}");
        for needle in needles {
            assert!(err.contains(needle), "{dir}: {needle:?} not in {err}");
        }
    }
    for dir in [&open, &theirs] {
        let entries: Vec<_> = std::fs::read_dir(dir).expect("read").collect();
        assert!(entries.is_empty(), "init wrote into {}", dir.display());
    }
    assert!(!tmp.path().join("nowhere").exists());
    // The same directory, made ours and closed, is taken.
    let me = std::fs::metadata(tmp.path()).expect("stat").uid();
    std::os::unix::fs::chown(&theirs, Some(me), None).expect("chown back");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    for dir in ["open", "theirs"] {
        let out = init(tmp.path(), &["--dir", dir]);
        assert!(
            out.status.success(),
            "{dir}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// With one chat admin nobody could approve a restart (the approver is
/// never the requester): the policy says so instead of requiring it, and
/// init says what to do; with two, a restart needs one approval.
#[test]
fn init_requires_a_restart_approval_only_when_someone_can_give_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let alice = "irc:example:alice!*@ops.example.com";
    let bob = "irc:example:bob!*@ops.example.com";
    let common = [
        "--chat",
        "irc",
        "--irc-server",
        "irc.example.com",
        "--irc-network",
        "example",
    ];
    for (dir, admins, required) in [("one", vec![alice], false), ("two", vec![alice, bob], true)] {
        let mut args = vec!["--dir", dir];
        args.extend(common);
        for a in admins {
            args.extend(["--chat-admin", a]);
        }
        let out = init(tmp.path(), &args);
        assert!(
            out.status.success(),
            "{dir}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let policy =
            std::fs::read_to_string(tmp.path().join(dir).join("policy.toml")).expect("policy.toml");
        let parsed =
            fleetcmd_core::policy::Policy::parse(&policy).unwrap_or_else(|e| panic!("{e}"));
        let restart = parsed.command("restart").expect("restart");
        assert_eq!(restart.requires_approvals, u32::from(required), "{dir}");
        let said = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            said.contains("restart runs without approval"),
            !required,
            "{dir}: {said}"
        );
        if !required {
            assert!(
                policy.contains("\n# requires_approvals = 1\n") && said.contains("uncomment"),
                "{dir}: {policy}"
            );
        }
    }
}

/// `init --help` shows init's own options under `Options:`, and the
/// client's connection options apart, under a heading that says init does
/// not use them.
#[test]
fn init_help_keeps_its_own_options_apart_from_the_connection_ones() {
    let out = init(Path::new("."), &["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let (own, conn) = help
        .split_once("Connection to a running controller (not used by init or dev):")
        .unwrap_or_else(|| panic!("no connection heading:\n{help}"));
    let own = own
        .split_once("Options:")
        .unwrap_or_else(|| panic!("no Options heading:\n{help}"))
        .1;
    // Whether a section lists an option (a line that starts with it).
    let lists = |section: &str, flag: &str| {
        section
            .lines()
            .any(|l| l.split_whitespace().next() == Some(flag))
    };
    for flag in [
        "--dir",
        "--url",
        "--listen",
        "--operator",
        "--host",
        "--chat-admin",
    ] {
        assert!(lists(own, flag), "{flag} not among init's own:\n{help}");
    }
    for flag in [
        "--controller",
        "--ca",
        "--cert",
        "--key",
        "--signing-key",
        "--raw",
    ] {
        assert!(
            lists(conn, flag) && !lists(own, flag),
            "{flag} not apart:\n{help}"
        );
    }
    assert!(
        help.contains("`--url` is the address the new controller will have"),
        "{help}"
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
        // Anyone can take a nick: an IRC admin names the host.
        (
            vec!["--chat-admin", "irc:x:alice!*@*"],
            "anyone can take a nick",
        ),
        (
            vec!["--chat-admin", "irc:x:alice!a@h*"],
            "anyone can take a nick",
        ),
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
