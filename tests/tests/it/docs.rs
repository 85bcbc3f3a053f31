//! The README's "Setting up a team's fleet in chat", run as written: every
//! shell block marked `<!-- docs-test: ROLE -->` is extracted from README.md
//! (not copied here) and run with bash, in order, with the real binaries on
//! PATH. The only changes are the documented example names: the controller
//! `ctl.example.com:7443` and the IRC server `irc.example.com:6667` become
//! loopback addresses on free ports, and alice's `ops.example.com` is
//! loopback. `controller` blocks run in one working
//! directory; `each-host` blocks run once per host in its own mount and UTS
//! namespace (its own /etc/fleetcmd, /var/lib/fleetcmd and host name), in a
//! directory holding only its join file, as if copied there, with the
//! README's placeholder `HOST.join` naming that file. Then alice, a
//! real IRC client on a real ngircd, types the README's chat command and
//! both hosts answer.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::ngircd::Ngircd;

const HOSTS: [&str; 2] = ["web-1", "db-1"];

/// One marked block of the README.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Block {
    role: String,
    script: String,
}

/// The shell blocks after `<!-- docs-test: ROLE -->` markers, in order.
fn marked_blocks(markdown: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut lines = markdown.lines();
    while let Some(line) = lines.next() {
        let Some(role) = line
            .trim()
            .strip_prefix("<!-- docs-test:")
            .and_then(|r| r.strip_suffix("-->"))
        else {
            continue;
        };
        let fence = lines.next().unwrap_or_default();
        assert_eq!(
            fence.trim(),
            "```sh",
            "a docs-test marker must precede a sh block"
        );
        let script: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
        blocks.push(Block {
            role: role.trim().to_string(),
            script: script.join("\n") + "\n",
        });
    }
    blocks
}

/// Processes a block left running (`... &`): each block's bash is a process
/// group leader, and its background children stay in its group.
struct Groups(Vec<u32>);

impl Drop for Groups {
    fn drop(&mut self) {
        for pgid in &self.0 {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pgid}")])
                .stderr(Stdio::null())
                .status();
        }
    }
}

struct Run {
    work: PathBuf,
    path: String,
    groups: Groups,
    log: PathBuf,
}

impl Run {
    /// Runs `script` with bash in `cwd` (through `wrap`, e.g. unshare);
    /// what it prints goes to the log; panics with the log when it fails.
    fn block(&mut self, what: &str, wrap: &[&str], cwd: &Path, script: &str) {
        use std::os::unix::process::CommandExt as _;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let mut cmd = Command::new(wrap.first().copied().unwrap_or("bash"));
        cmd.args(wrap.iter().skip(1));
        if !wrap.is_empty() {
            cmd.arg("bash");
        }
        let child = cmd
            .args(["-euo", "pipefail", "-c", script])
            .current_dir(cwd)
            .env("PATH", &self.path)
            .env_remove("FLEETCMD_CONTROLLER")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: starting bash: {e}"));
        self.groups.0.push(child.id());
        let status = child.wait_with_output().expect("wait").status;
        assert!(
            status.success(),
            "{what} failed ({status}):\n{script}\n--- log:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `fleetcmd` as the operator init wrote (its env file), for waiting.
    fn fleetcmd(&self, args: &[&str]) -> String {
        let out = Command::new("bash")
            .args([
                "-c",
                &format!(". fleet/operator/alice.env && fleetcmd {}", args.join(" ")),
            ])
            .current_dir(&self.work)
            .env("PATH", &self.path)
            .output()
            .expect("fleetcmd runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A user on IRC: registers, joins, says something, reads what comes.
pub(crate) struct IrcUser {
    lines: tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    out: tokio::net::tcp::OwnedWriteHalf,
}

impl IrcUser {
    pub(crate) async fn connect(port: u16, nick: &str) -> IrcUser {
        let s = TcpStream::connect(("127.0.0.1", port)).await.expect("irc");
        let (r, w) = s.into_split();
        let mut u = IrcUser {
            lines: BufReader::new(r).lines(),
            out: w,
        };
        u.send(&format!("NICK {nick}\r\nUSER {nick} 0 * :{nick}\r\n"))
            .await;
        u.until(|l| l.split(' ').nth(1) == Some("001")).await;
        u
    }

    pub(crate) async fn send(&mut self, text: &str) {
        self.out.write_all(text.as_bytes()).await.expect("irc send");
    }

    /// Reads lines (answering PINGs) until one satisfies `done`; all read.
    pub(crate) async fn until(&mut self, mut done: impl FnMut(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = tokio::time::timeout(left, self.lines.next_line())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "IRC: nothing expected within 30 s; saw:\n{}",
                        seen.join("\n")
                    )
                })
                .expect("irc read")
                .expect("irc connection open");
            if let Some(p) = line.strip_prefix("PING ") {
                self.send(&format!("PONG {p}\r\n")).await;
            }
            let stop = done(&line);
            seen.push(line);
            if stop {
                return seen;
            }
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[test]
fn markers_pick_the_sh_blocks_that_follow_them() {
    let md = "# x\n<!-- docs-test: controller -->\n```sh\na\nb &\n```\ntext\n```sh\nnot marked\n```\n<!-- docs-test: each-host -->\n```sh\nc\n```\n";
    assert_eq!(
        marked_blocks(md),
        vec![
            Block {
                role: "controller".into(),
                script: "a\nb &\n".into()
            },
            Block {
                role: "each-host".into(),
                script: "c\n".into()
            },
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_takes_a_team_from_nothing_to_a_chat_answer_from_two_hosts() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let chat_command = "!run uptime on all";
    assert!(
        readme.contains(&format!("In `#ops`, as alice: `{chat_command}`")),
        "the README's chat step changed: update this test's chat command"
    );
    let blocks = marked_blocks(&readme);
    assert!(
        blocks.iter().any(|b| b.role == "each-host") && blocks.len() >= 3,
        "README lost its docs-test blocks: {blocks:?}"
    );
    let probe = Command::new("unshare")
        .args(["-m", "-u", "--propagation", "private", "true"])
        .status();
    assert!(
        probe.is_ok_and(|s| s.success()),
        "this test needs root and `unshare -m -u` (util-linux) to give each host its own /etc/fleetcmd and host name"
    );
    let irc = Ngircd::start(None).await;
    let ctl_port = free_port();
    let map = |s: &str| {
        s.replace("ctl.example.com:7443", &format!("127.0.0.1:{ctl_port}"))
            .replace("irc.example.com:6667", &format!("127.0.0.1:{}", irc.port))
            // Where alice connects from.
            .replace("ops.example.com", "127.0.0.1")
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let work = tmp.path().join("controller-host");
    std::fs::create_dir(&work).expect("work dir");
    let bin_dir = fleetcmd_tests::workspace_bin("fleetcmd")
        .parent()
        .expect("bin dir")
        .to_owned();
    let mut run = Run {
        work: work.clone(),
        path: format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        ),
        groups: Groups(Vec::new()),
        log: tmp.path().join("blocks.log"),
    };
    for dir in ["/etc/fleetcmd", "/var/lib/fleetcmd"] {
        std::fs::create_dir_all(dir).expect("mount point");
    }
    let mut answered = None;
    let mut gateway_group = None;
    for (i, block) in blocks.iter().enumerate() {
        let script = map(&block.script);
        match block.role.as_str() {
            "controller" => {
                run.block(&format!("README block {i}"), &[], &work, &script);
                if script.contains("fleetcmd-gateway") {
                    gateway_group = run.groups.0.last().copied();
                }
                if script.contains("fleetcmd-controller") {
                    wait_listening(ctl_port, &run).await;
                }
                if script.contains("fleetcmd run") {
                    answered = Some(run.log_text());
                }
            }
            "each-host" => {
                for host in HOSTS {
                    let dir = tmp.path().join(host);
                    std::fs::create_dir(&dir).expect("host dir");
                    let join = format!("{host}.join");
                    std::fs::copy(work.join("fleet/hosts").join(&join), dir.join(&join))
                        .expect("the join file init wrote");
                    // The host name is not the --host name: the join file
                    // is named, not found through `hostname`.
                    let host_script = format!(
                        "mount -t tmpfs fleetcmd-etc /etc/fleetcmd\n\
                         mount -t tmpfs fleetcmd-state /var/lib/fleetcmd\n\
                         hostname {host}.example.com\n{}",
                        script.replace("HOST.join", &join)
                    );
                    run.block(
                        &format!("README block {i} on {host}"),
                        &["unshare", "-m", "-u", "--propagation", "private"],
                        &dir,
                        &host_script,
                    );
                }
                wait_agents_online(&run).await;
            }
            other => panic!("unknown docs-test role {other:?}"),
        }
    }
    let answered = answered.expect("the README runs a command as the operator");
    for host in HOSTS {
        assert!(
            answered.contains(&format!("{host}: ")) && answered.contains("load average"),
            "`fleetcmd run uptime --on all` did not show {host}:\n{answered}"
        );
    }
    // The first chat command, from alice on IRC.
    let mut alice = IrcUser::connect(irc.port, "alice").await;
    alice.send("JOIN #ops\r\n").await;
    // The bot is in the channel already (NAMES lists it) or joins later.
    let bot_listed = alice
        .until(|l| l.split(' ').nth(1) == Some("366"))
        .await
        .iter()
        .filter(|l| l.split(' ').nth(1) == Some("353"))
        .any(|l| {
            l.rsplit(':').next().is_some_and(|nicks| {
                nicks
                    .split(' ')
                    .any(|n| n.trim_start_matches(['@', '+']) == "fleetcmd")
            })
        });
    if !bot_listed {
        alice
            .until(|l| l.starts_with(":fleetcmd!") && l.contains(" JOIN "))
            .await;
    }
    alice
        .send(&format!("PRIVMSG #ops :{chat_command}\r\n"))
        .await;
    let mut from_bot = Vec::new();
    alice
        .until(|l| {
            if l.starts_with(":fleetcmd!") && l.contains(" PRIVMSG #ops :") {
                from_bot.push(l.to_string());
            }
            let all = from_bot.join("\n");
            HOSTS.iter().all(|h| all.contains(h)) && all.contains("load average")
        })
        .await;
    let all = from_bot.join("\n");
    assert!(
        !all.contains("not allowed") && !all.contains("denied"),
        "{all}"
    );
    // Stopping the gateway (SIGTERM, as systemd does): the bot says QUIT.
    let group = gateway_group.expect("the README starts the gateway");
    let term = Command::new("pkill")
        .args(["-TERM", "-f", "-g", &group.to_string(), "fleetcmd-gateway"])
        .status()
        .expect("pkill");
    assert!(term.success(), "no fleetcmd-gateway in group {group}");
    // Its own QUIT, not the server's note of a dropped connection.
    alice
        .until(|l| {
            l.starts_with(":fleetcmd!")
                && l.contains(" QUIT ")
                && l.contains("fleetcmd gateway stopping")
        })
        .await;
}

async fn wait_listening(port: u16, run: &Run) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the controller did not listen on {port} within 20 s:\n{}",
            run.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_agents_online(run: &Run) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let agents = run.fleetcmd(&["agents"]);
        let online = HOSTS
            .iter()
            .filter(|h| {
                agents
                    .lines()
                    .any(|l| l.starts_with(*h) && l.contains("online"))
            })
            .count();
        if online == HOSTS.len() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the hosts did not come online within 30 s:\n{agents}\n{}",
            run.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
