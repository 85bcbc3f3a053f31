//! Plugins through the real gateway loop and the console adapter: the
//! example plugins (examples/plugins), and plugins that crash, hang, flood
//! or ask for a job their caller may not run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fleetcmd_core::job::JobSpec;
use fleetcmd_gateway::Gateway;
use fleetcmd_gateway::adapters::console::ConsoleAdapter;
use fleetcmd_gateway::plugins::PluginHost;
use fleetcmd_gateway::plugins::config::{PluginConfig, load};
use fleetcmd_gateway::router::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{FakeController, POLICY_BODY, router_for};

const GRANTS: &str = r#"
[roles.plugins]
commands = []
may = ["plugin:greet.*", "plugin:clock.clock", "plugin:crash.*", "plugin:hang.*", "plugin:flood.*", "plugin:env.*", "plugin:stale.*", "plugin:spy.*", "plugin:escape.*", "plugin:ahead.*", "plugin:sys.*", "plugin:exit159.*"]

[roles.greeter]
commands = []
may = ["plugin:greet.*"]

[[bindings]]
subjects = ["console:alice"]
roles = ["plugins"]

[[bindings]]
subjects = ["console:erin"]
roles = ["greeter"]
"#;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/plugins")
}

/// A test plugin in `dir`: manifest and a Python body after the common
/// JSON-RPC loop (`answer(params)` returns the command result).
pub(crate) fn test_plugin(dir: &Path, name: &str, body: &str) -> PathBuf {
    let d = dir.join(name);
    // `state/`: the one place the sandboxed plugin may write (granted by
    // `entry`), where it counts its starts.
    std::fs::create_dir_all(d.join("state")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        d.join("plugin.toml"),
        format!("name = \"{name}\"\nprotocol = 1\nexecutable = \"p.py\"\n[[commands]]\nverb = \"{name}\"\nsummary = \"test\"\nargs = [{{ name = \"how\", optional = true }}]\n"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let script = format!(
        r#"#!/usr/bin/env python3
import json, os, sys
with open("state/starts", "a") as f:
    f.write("x")
CALL = [None]
{body}
for line in sys.stdin:
    msg = json.loads(line)
    CALL[0] = msg["id"]
    if msg["method"] == "initialize":
        result = {{"protocol_version": 1, "commands": ["{name}"]}}
    else:
        result = answer(msg["params"])
    sys.stdout.write(json.dumps({{"jsonrpc": "2.0", "id": msg["id"], "result": result}}) + "\n")
    sys.stdout.flush()
"#
    );
    let exe = d.join("p.py");
    std::fs::write(&exe, script).unwrap_or_else(|e| panic!("{e}"));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("{e}"));
    d.join("plugin.toml")
}

pub(crate) fn entry(manifest: PathBuf, extra: &str) -> PluginConfig {
    let state = manifest.with_file_name("state");
    let write = if state.is_dir() && !extra.contains("write") {
        format!("write = [{:?}]\n", state.display().to_string())
    } else {
        String::new()
    };
    toml::from_str(&format!(
        "manifest = {:?}\n{write}{extra}",
        manifest.display().to_string()
    ))
    .unwrap_or_else(|e| panic!("{e}"))
}

struct Setup {
    router: Arc<Router<FakeController>>,
    _dir: tempfile::TempDir,
    dir: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().to_path_buf();
    let token = path.join("greet-token");
    crate::support::write_private(&token, "s3cret\n");
    let entries = vec![
        entry(
            examples().join("python/plugin.toml"),
            &format!(
                "secrets.GREET_TOKEN = {{ file = {:?} }}",
                token.display().to_string()
            ),
        ),
        entry(examples().join("shell/plugin.toml"), ""),
        entry(
            test_plugin(&path, "crash", "def answer(p):\n    sys.exit(3)\n"),
            "restart_min = \"1s\"",
        ),
        entry(
            test_plugin(
                &path,
                "hang",
                "import time\ndef answer(p):\n    time.sleep(60)\n",
            ),
            "call_timeout = \"1s\"",
        ),
        entry(
            test_plugin(
                &path,
                "flood",
                "def answer(p):\n    if p['args']:\n        sys.stdout.write('x' * 1000000 + '\\n'); sys.stdout.flush()\n    return {'lines': ['y' * 100] * 2000}\n",
            ),
            "",
        ),
        entry(
            test_plugin(
                &path,
                "env",
                "def answer(p):\n    env = sorted(k.split(b'=')[0].decode() for k in open('/proc/self/environ','rb').read().split(b'\\0') if k)\n    fds = sorted(os.listdir('/proc/self/fd'))\n    try:\n        bytearray(4 << 30)\n        mem = 'unlimited'\n    except MemoryError:\n        mem = 'limited'\n    return {'lines': ['env ' + ','.join(env), 'fds ' + ','.join(fds), 'memory ' + mem]}\n",
            ),
            "memory_mb = 256",
        ),
        // Asks for a job naming the call it answered before this one (as a
        // job.run left in the pipe after its call ended would).
        entry(
            test_plugin(
                &path,
                "stale",
                "last = [None]\ndef answer(p):\n    mine = last[0]\n    last[0] = CALL[0]\n    if mine is None:\n        return {'lines': ['armed']}\n    sys.stdout.write(json.dumps({'jsonrpc': '2.0', 'id': 'j', 'method': 'job.run', 'params': {'call': mine, 'command': 'uptime', 'args': [], 'selector': 'all'}}) + '\\n'); sys.stdout.flush()\n    reply = json.loads(sys.stdin.readline())\n    return {'lines': ['job.run: ' + reply.get('error', {}).get('message', 'ran')]}\n",
            ),
            "",
        ),
    ];
    let mut entries = entries;
    entries.push(entry(test_plugin(&path, "spy", &spy_body(&token)), ""));
    entries.push(entry(test_plugin(&path, "escape", ESCAPE_BODY), ""));
    // Names, during one call, the id the next call would have if ids
    // counted up; then reports the ids it saw.
    entries.push(entry(
        test_plugin(
            &path,
            "ahead",
            "seen = []\ndef answer(p):\n    seen.append(CALL[0])\n    sys.stdout.write(json.dumps({'jsonrpc': '2.0', 'id': 'j', 'method': 'job.run', 'params': {'call': CALL[0] + 1, 'command': 'uptime', 'args': [], 'selector': 'all'}}) + '\\n'); sys.stdout.flush()\n    reply = json.loads(sys.stdin.readline())\n    return {'lines': ['ids ' + ','.join(str(i) for i in seen), 'job.run: ' + reply.get('error', {}).get('message', 'ran')]}\n",
        ),
        "",
    ));
    // Exits with the code a reaper of old reported as SIGSYS.
    entries.push(entry(
        test_plugin(&path, "exit159", "def answer(p):\n    os._exit(159)\n"),
        "",
    ));
    // Makes an x32 system call, which its sandbox kills.
    entries.push(entry(
        test_plugin(
            &path,
            "sys",
            "import ctypes\ndef answer(p):\n    ctypes.CDLL(None).syscall(0x40000000 + 39)\n    return {'lines': ['survived']}\n",
        ),
        "",
    ));
    let specs = load(&entries).unwrap_or_else(|e| panic!("{e}"));
    let router = router_for(4, &format!("{POLICY_BODY}\n{GRANTS}"), |_| {});
    // What the `plugin` component's build does with the registry.
    router
        .register_commands(Arc::new(PluginHost::new(specs)))
        .unwrap_or_else(|e| panic!("{e}"));
    Setup {
        router,
        dir: path,
        _dir: dir,
    }
}

/// A hostile plugin: tries, one line each, everything its sandbox must
/// refuse — the gateway's files, memory, environment and process, another
/// plugin's environment and secret file, writing outside its grants.
/// The gateway here is this test process.
fn spy_body(other_secret: &Path) -> String {
    format!(
        r#"import ctypes, glob, socket
GW = {gw}
KEY = {key:?}
OTHER_SECRET = {secret:?}
SOCK = {sock:?}
def attempt(label, f):
    try:
        f()
        return label + ' ALLOWED'
    except Exception as e:
        return label + ' refused (' + type(e).__name__ + ')'
def ptrace():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ptrace(16, GW, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), 'ptrace')
def unix_connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(SOCK)
def unix_dgram():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.sendto(b'x', SOCK + '.dgram')
def unix_raw():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_RAW)
    a.sendto(b'x', SOCK + '.dgram')
def io_uring():
    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(120)
    if libc.syscall(425, 4, params) < 0:
        raise OSError(ctypes.get_errno(), 'io_uring_setup')
def greet_env():
    found = [p for p in glob.glob('/proc/[0-9]*') if b'greet.py' in open(p + '/cmdline', 'rb').read()]
    if not found:
        return
    open(found[0] + '/environ', 'rb').read()
def answer(p):
    return {{'lines': [
        attempt('key', lambda: open(KEY).read()),
        attempt('environ', lambda: open('/proc/%d/environ' % GW, 'rb').read()),
        attempt('mem', lambda: open('/proc/%d/mem' % GW, 'rb')),
        attempt('fds', lambda: [os.readlink('/proc/%d/fd/%s' % (GW, f)) for f in os.listdir('/proc/%d/fd' % GW)]),
        attempt('signal', lambda: os.kill(GW, 0)),
        attempt('ptrace', ptrace),
        attempt('other-env', greet_env),
        attempt('other-secret', lambda: open(OTHER_SECRET).read()),
        attempt('write-tmp', lambda: open('/tmp/fleetcmd-plugin-spy-%d' % GW, 'w')),
        attempt('unix-socket', unix_connect),
        attempt('unix-dgram', unix_dgram),
        attempt('unix-raw', unix_raw),
        attempt('io-uring', io_uring),
        attempt('scratch', lambda: open(os.environ['HOME'] + '/x', 'w').write('x')),
        'uid %d' % os.getuid(),
        [l for l in open('/proc/self/limits') if l.startswith('Max processes')][0].strip(),
    ]}}
"#,
        gw = std::process::id(),
        key = other_secret
            .with_file_name("gateway.key")
            .display()
            .to_string(),
        secret = other_secret.display().to_string(),
        sock = other_secret
            .with_file_name("gateway.sock")
            .display()
            .to_string(),
    )
}

/// A plugin whose grandchild leaves its session and process group (as a
/// daemonising script would), then, on `die`, exits.
const ESCAPE_BODY: &str = r#"
def answer(p):
    if p['args'] == ['die']:
        sys.exit(0)
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv('/bin/sleep', ['sleep', '4242.%d' % os.getppid()])
        os._exit(0)
    os.wait()
    return {'lines': ['escaped']}
"#;

/// Processes of this machine running `sleep 4242.*` (the escapees).
fn escapees() -> Vec<String> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .filter(|c| c.starts_with("sleep 4242."))
                .collect()
        })
        .unwrap_or_default()
}

/// Types `lines` as `who` on a console served by the real gateway loop
/// and returns everything it printed once the input ended.
pub(crate) async fn console(
    router: &Arc<Router<FakeController>>,
    who: &str,
    lines: &[&str],
) -> String {
    let mut gw = Gateway::new(router.clone());
    let (mut user_in, adapter_in) = tokio::io::duplex(1 << 16);
    let (adapter_out, mut user_out) = tokio::io::duplex(1 << 22);
    let console = ConsoleAdapter::new(tokio::io::BufReader::new(adapter_in), adapter_out, who)
        .unwrap_or_else(|e| panic!("{e}"));
    gw.add(console);
    let run = tokio::spawn(gw.run(None));
    for l in lines {
        user_in
            .write_all(format!("{l}\n").as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    drop(user_in);
    let reader = tokio::spawn(async move {
        let mut text = String::new();
        let _ = user_out.read_to_string(&mut text).await;
        text
    });
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .unwrap_or_else(|_| panic!("gateway did not stop"))
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    reader.await.unwrap_or_else(|e| panic!("{e}"))
}

pub(crate) fn reported(
    router: &Router<FakeController>,
    kind: &str,
) -> Vec<(String, String, String, String)> {
    router
        .controller()
        .reported()
        .into_iter()
        .filter(|r| r.0 == kind)
        .collect()
}

#[tokio::test]
async fn the_python_example_answers_with_the_verified_caller_and_its_declared_secret() {
    let s = setup();
    let out = console(&s.router, "alice", &["greet", "greet \"Ada L\""]).await;
    assert!(out.contains("hello alice from console in console"), "{out}");
    assert!(out.contains("hello Ada L from console"), "{out}");
    assert!(out.contains("token configured: yes"), "{out}");
    let calls = reported(&s.router, "chat_command");
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(
        (calls[0].1.as_str(), calls[0].2.as_str()),
        ("console:alice", "greet")
    );
    assert!(calls[0].3.contains("answered by plugin greet"), "{calls:?}");
}

#[tokio::test]
async fn the_shell_example_answers() {
    let s = setup();
    let out = console(&s.router, "alice", &["clock"]).await;
    assert!(out.contains("on the gateway"), "{out}");
    assert!(out.contains("clock: answered by plugin clock"), "{out}");
}

#[tokio::test]
async fn plugin_commands_are_refused_audited_and_hidden_without_a_grant() {
    let s = setup();
    let mut out = console(&s.router, "erin", &["clock"]).await;
    out.push_str(&console(&s.router, "erin", &["help"]).await);
    out.push_str(&console(&s.router, "erin", &["help greet"]).await);
    // Answered as an unknown verb: the plugin stays hidden (the audit
    // record below keeps the detail).
    assert!(out.contains("unknown command `clock`; try `help`"), "{out}");
    assert!(!out.contains("plugin:clock"), "{out}");
    let also = out
        .lines()
        .find(|l| l.contains("also: "))
        .unwrap_or_default();
    assert!(also.contains("greet [name]"), "{out}");
    assert!(
        !also.contains("clock") && also.contains("loadcheck <selector>"),
        "help shows only usable plugin commands: {out}"
    );
    assert!(
        out.contains("Say hello to the caller (plugin greet)"),
        "{out}"
    );
    let denied = reported(&s.router, "chat_denied");
    assert!(
        denied
            .iter()
            .any(|d| d.1 == "console:erin" && d.2 == "clock" && d.3.contains("plugin:clock.clock")),
        "{denied:?}"
    );
    // Nothing was called, so no call is audited.
    assert!(reported(&s.router, "chat_command").is_empty());
}

#[tokio::test]
async fn a_plugins_job_runs_as_the_caller_and_is_refused_when_the_caller_may_not_run_it() {
    let s = setup();
    // erin may use the plugin but run no command: the job is refused,
    // audited, nothing submitted, and the plugin is told.
    let out = console(&s.router, "erin", &["loadcheck role=web"]).await;
    assert!(s.router.controller().submitted().is_empty(), "{out}");
    assert!(
        out.contains("job not run: refused:"),
        "the plugin is told why: {out}"
    );
    let denied = reported(&s.router, "chat_denied");
    assert!(
        denied
            .iter()
            .any(|d| d.1 == "console:erin" && d.2 == "uptime"),
        "{denied:?}"
    );
    // alice may run uptime: the job is signed with her as requester.
    let out = console(&s.router, "alice", &["loadcheck role=web"]).await;
    let submitted = s.router.controller().submitted();
    assert_eq!(submitted.len(), 1, "{out}");
    let spec = JobSpec::from_bytes(&submitted[0].spec).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (
            spec.requester.as_str(),
            spec.command.as_str(),
            spec.selector.as_str()
        ),
        ("console:alice", "uptime", "role=web")
    );
    assert!(
        out.contains("up 3 days"),
        "the result reached the chat: {out}"
    );
    let job_id = spec.id.as_str();
    assert!(
        out.contains(&format!("job {job_id} submitted as you")),
        "the plugin got the job id: {out}"
    );
    // The plugin's call itself is audited once per caller, and the job
    // it started once more, naming the plugin.
    let calls = reported(&s.router, "chat_command");
    assert_eq!(
        calls
            .iter()
            .filter(|c| c.2 == "loadcheck" && !c.3.contains("started via plugin"))
            .map(|c| c.1.as_str())
            .collect::<Vec<_>>(),
        ["console:erin", "console:alice"]
    );
    assert!(
        calls.iter().any(|c| c.1 == "console:alice"
            && c.3 == format!("job {job_id} (uptime on role=web) started via plugin greet")),
        "{calls:#?}"
    );
}

/// A `job.run` runs only as the caller of the call it names: one naming
/// an earlier call (left in the pipe after that call ended, to run as
/// whoever calls next — found by an outside test) runs nothing.
#[tokio::test]
async fn a_job_run_naming_another_call_runs_nothing() {
    let s = setup();
    // Ids cannot be guessed: one named ahead of time runs nothing.
    let ahead = console(&s.router, "alice", &["ahead", "ahead"]).await;
    assert!(
        ahead.matches("job.run: job.run names call").count() == 2,
        "{ahead}"
    );
    let ids: Vec<u64> = ahead
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ids "))
        .next_back()
        .unwrap_or_default()
        .split(',')
        .filter_map(|i| i.parse().ok())
        .collect();
    assert!(
        ids.len() == 2 && ids[1] != ids[0] + 1 && ids.iter().all(|&i| i > 1000),
        "request ids must not count up: {ids:?}"
    );
    let first = console(&s.router, "alice", &["stale"]).await;
    assert!(first.contains("armed"), "{first}");
    let second = console(&s.router, "alice", &["stale"]).await;
    assert!(
        second.contains("job.run: job.run names call") && second.contains("nothing run"),
        "{second}"
    );
    assert!(s.router.controller().submitted().is_empty(), "{second}");
}

#[tokio::test]
async fn a_crashing_plugin_is_not_available_the_gateway_keeps_serving_and_it_is_restarted_after_its_backoff()
 {
    let s = setup();
    // One console per command: the gateway serves a console's commands
    // concurrently, and these are about their order.
    let mut out = String::new();
    for c in ["crash", "crash", "greet"] {
        out.push_str(&console(&s.router, "alice", &[c]).await);
    }
    assert!(out.contains("plugin crash is not available"), "{out}");
    assert!(out.contains("exited with exit status: 3"), "{out}");
    assert!(
        out.contains("trying again in 1s"),
        "the second call waits for the backoff: {out}"
    );
    assert!(out.contains("hello alice"), "other plugins go on: {out}");
    let starts = s.dir.join("crash/state/starts");
    assert_eq!(std::fs::read_to_string(&starts).unwrap_or_default(), "x");
    // Once the backoff has passed, it is started again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&starts).unwrap_or_default() != "xx" {
        assert!(tokio::time::Instant::now() < deadline, "not restarted");
        let _ = console(&s.router, "alice", &["crash"]).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_hanging_plugin_times_out_and_is_stopped() {
    let s = setup();
    let started = std::time::Instant::now();
    let out = console(&s.router, "alice", &["hang"]).await;
    assert!(
        out.contains("plugin hang did not answer within 1s"),
        "{out}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let calls = reported(&s.router, "chat_command");
    assert!(
        calls
            .iter()
            .any(|c| c.2 == "hang" && c.3.contains("did not answer")),
        "{calls:?}"
    );
}

#[tokio::test]
async fn a_flooding_plugin_is_cut_and_an_overlong_line_stops_it() {
    let s = setup();
    let mut out = console(&s.router, "alice", &["flood"]).await;
    out.push_str(&console(&s.router, "alice", &["flood big"]).await);
    assert!(out.contains("(plugin output cut: "), "{out}");
    assert!(
        out.contains("over the 16384-byte limit of a reply"),
        "{out}"
    );
    assert!(
        out.len() < 200_000,
        "the flood did not reach the chat: {} bytes",
        out.len()
    );
    assert!(out.contains("it wrote a line over 262144 bytes"), "{out}");
}

#[tokio::test]
async fn a_plugin_gets_only_path_and_its_declared_secrets_no_fds_and_bounded_memory() {
    let s = setup();
    let out = console(&s.router, "alice", &["env"]).await;
    assert!(out.contains("env HOME,PATH,TMPDIR\n"), "{out}");
    assert!(out.contains("memory limited"), "{out}");
    let fds = out
        .lines()
        .find_map(|l| l.split("fds ").nth(1))
        .unwrap_or_default()
        .to_string();
    let fds: Vec<&str> = fds.split(',').collect();
    assert!(
        fds.len() <= 4 && fds.iter().all(|f| ["0", "1", "2", "3"].contains(f)),
        "{fds:?}"
    );
}

#[tokio::test]
async fn a_sandboxed_plugin_cannot_reach_the_gateways_keys_memory_process_or_another_plugin() {
    let s = setup();
    crate::support::write_private(s.dir.join("gateway.key"), "PRIVATE KEY\n");
    // A local service on a Unix socket with a path (Landlock does not
    // govern connecting to one; the seccomp filter must).
    let _listener = std::os::unix::net::UnixListener::bind(s.dir.join("gateway.sock"))
        .unwrap_or_else(|e| panic!("{e}"));
    let _datagrams = std::os::unix::net::UnixDatagram::bind(s.dir.join("gateway.sock.dgram"))
        .unwrap_or_else(|e| panic!("{e}"));
    let out = console(&s.router, "alice", &["greet", "spy"]).await;
    assert!(
        out.contains("hello alice"),
        "greet runs, for its environment: {out}"
    );
    for attack in [
        "key",
        "environ",
        "mem",
        "fds",
        "signal",
        "ptrace",
        "other-env",
        "other-secret",
        "write-tmp",
        "unix-socket",
        "unix-dgram",
        "unix-raw",
        "io-uring",
    ] {
        assert!(
            out.contains(&format!("{attack} refused")),
            "{attack} must be refused: {out}"
        );
    }
    assert!(
        !out.contains("ALLOWED\n") || out.contains("scratch ALLOWED"),
        "{out}"
    );
    assert!(
        out.lines().filter(|l| l.contains("ALLOWED")).count() == 1,
        "only its scratch directory is writable: {out}"
    );
    assert!(out.contains("uid 65534"), "unmapped user inside: {out}");
    assert!(
        out.contains("Max processes             64"),
        "process limit: {out}"
    );
}

#[tokio::test]
async fn a_system_call_its_sandbox_kills_is_named_as_such() {
    let s = setup();
    let out = console(&s.router, "alice", &["sys"]).await;
    assert!(
        out.contains("SIGSYS") && out.contains("system call its sandbox forbids"),
        "{out}"
    );
    let denied = reported(&s.router, "chat_denied");
    assert!(
        denied.iter().any(|r| format!("{r:?}").contains("SIGSYS")),
        "audited with the reason: {denied:?}"
    );
    // An exit code is not a signal.
    let out = console(&s.router, "alice", &["exit159"]).await;
    assert!(
        out.contains("exited with exit status: 159") && !out.contains("SIGSYS"),
        "{out}"
    );
}

#[tokio::test]
async fn a_plugins_children_that_leave_its_session_die_with_it() {
    let s = setup();
    let out = console(&s.router, "alice", &["escape"]).await;
    assert!(out.contains("escaped"), "{out}");
    // It may take a moment to exec `sleep`.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while escapees().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the escapee never ran"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = console(&s.router, "alice", &["escape die"]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !escapees().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "outlived the plugin: {:?}",
            escapees()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The outside attack's grants that reached the signing key, through the
/// real configuration: the packaged layout (keys in a folder beneath the
/// configuration directory), a link to the configuration directory, `..`,
/// the state directory, the CA file, a read grant beneath a write grant. Each is refused by `validate`, naming it.
#[test]
fn grants_that_would_reach_what_is_the_gateways_are_refused_by_validate() {
    use fleetcmd_gateway::config::GatewayConfig;
    let t = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let root = std::fs::canonicalize(t.path()).unwrap_or_else(|e| panic!("{e}"));
    let etc = root.join("etc/fleetcmd");
    for d in ["gateway", "plugins", "state", "secrets"] {
        std::fs::create_dir_all(etc.join(d)).unwrap_or_else(|e| panic!("{e}"));
    }
    std::fs::create_dir_all(root.join("var/greet/data")).unwrap_or_else(|e| panic!("{e}"));
    for f in [
        "gateway/main.key",
        "gateway/sign.key",
        "gateway/gw.pem",
        "ca.pem",
        "secrets/greet.token",
    ] {
        crate::support::write_private(etc.join(f), "x\n");
    }
    std::os::unix::fs::symlink(&etc, root.join("link")).unwrap_or_else(|e| panic!("{e}"));
    let manifest = test_plugin(
        &etc.join("plugins"),
        "greet2",
        "def answer(p):\n    return {}\n",
    );
    let problems = |grants: &str| {
        let text = format!(
            "controller = \"https://127.0.0.1:7443\"\nca = \"ca.pem\"\ncert = \"gateway/gw.pem\"\nkey = \"gateway/main.key\"\nsigning_key = \"gateway/sign.key\"\nsigner_id = \"gw\"\npolicy_roots = [\"ed25519:AAAA\"]\nstate_dir = \"state\"\n[console]\nenabled = true\n[[plugin]]\nmanifest = {:?}\n{grants}\n",
            manifest.display().to_string()
        );
        let file = etc.join("gateway.toml");
        crate::support::write_private(&file, &text);
        let all = GatewayConfig::load(&file)
            .unwrap_or_else(|e| panic!("{e}"))
            .validate()
            .err()
            .unwrap_or_default();
        all.into_iter()
            .filter(|p| p.key.starts_with("plugin"))
            .map(|p| p.message)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        problems(&format!(
            "read = [{:?}]",
            root.join("var/greet/data").display().to_string()
        )),
        Vec::<String>::new(),
        "a grant elsewhere, and the plugin's folder beneath the configuration directory, are fine"
    );
    for (grants, says) in [
        (
            format!("read = [{:?}]", etc.join("gateway").display().to_string()),
            "sign.key",
        ),
        (
            format!("read = [{:?}]", root.join("link").display().to_string()),
            "gateway.toml",
        ),
        (
            format!(
                "read = [{:?}]",
                etc.join("plugins/../ca.pem").display().to_string()
            ),
            "ca.pem",
        ),
        ("write = [\"state\"]".to_string(), "state"),
        ("read = [\"..\"]".to_string(), "would let the plugin reach"),
        (
            format!(
                "write = [{:?}]\nread = [{:?}]",
                root.join("var/greet").display().to_string(),
                root.join("var/greet/data").display().to_string()
            ),
            "lies beneath write grant",
        ),
    ] {
        let found = problems(&grants);
        assert!(
            found.iter().any(|m| m.contains(says)),
            "{grants}: {found:?} should name {says}"
        );
    }
    // A second name of the signing key inside a grant: no path check can
    // see it, so a key with more than one link is refused.
    std::fs::hard_link(etc.join("gateway/sign.key"), root.join("var/greet/data/k"))
        .unwrap_or_else(|e| panic!("{e}"));
    let found = problems(&format!(
        "read = [{:?}]",
        root.join("var/greet/data").display().to_string()
    ));
    assert!(
        found
            .iter()
            .any(|m| m.contains("sign.key has 2 hard links")),
        "{found:?}"
    );
}

/// One plugin may not write where another plugin's folder or grants are
/// (it could replace the other's code and so read its secrets), and a
/// plugin folder another local user owns, or can replace, is refused.
#[test]
fn a_plugin_that_could_change_another_or_be_changed_by_a_user_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let root = std::fs::canonicalize(t.path()).unwrap_or_else(|e| panic!("{e}"));
    let plugins = root.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap_or_else(|e| panic!("{e}"));
    let greet = test_plugin(&plugins, "greet", "def answer(p):\n    return {}\n");
    let other = test_plugin(&root, "other", "def answer(p):\n    return {}\n");
    let problems = |entries: Vec<PluginConfig>| match load(&entries) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems.into_iter().map(|(_, m)| m).collect::<Vec<_>>(),
    };
    let over = entry(
        other.clone(),
        &format!("write = [{:?}]", plugins.display().to_string()),
    );
    let found = problems(vec![entry(greet.clone(), ""), over]);
    assert!(
        found
            .iter()
            .any(|m| m.contains("plugin \"other\" may write") && m.contains("plugin \"greet\" has")),
        "{found:?}"
    );
    assert_eq!(
        problems(vec![entry(greet.clone(), ""), entry(other.clone(), "")]),
        Vec::<String>::new()
    );
    // Owned by another user (as root, the test can make it so).
    let folder = greet.parent().map(Path::to_path_buf).unwrap_or_default();
    if std::os::unix::fs::MetadataExt::uid(
        &std::fs::metadata(&root).unwrap_or_else(|e| panic!("{e}")),
    ) == 0
    {
        std::os::unix::fs::chown(&folder, Some(1000), None).unwrap_or_else(|e| panic!("{e}"));
        let found = problems(vec![entry(greet.clone(), "")]);
        assert!(
            found.iter().any(|m| m.contains("belongs to user 1000")),
            "{found:?}"
        );
        std::os::unix::fs::chown(&folder, Some(0), None).unwrap_or_else(|e| panic!("{e}"));
    }
    // Anything inside the folder another user owns or others may write:
    // a module the plugin imports is the plugin too.
    let module = folder.join("lib.py");
    std::fs::write(&module, "x = 1\n").unwrap_or_else(|e| panic!("{e}"));
    std::fs::set_permissions(&module, std::fs::Permissions::from_mode(0o666))
        .unwrap_or_else(|e| panic!("{e}"));
    let found = problems(vec![entry(greet.clone(), "")]);
    assert!(
        found
            .iter()
            .any(|m| m.contains("lib.py in the plugin's folder is writable by group or others")),
        "{found:?}"
    );
    std::fs::remove_file(&module).unwrap_or_else(|e| panic!("{e}"));
    // A link out of the folder to a file another user owns (as root the
    // test can make one).
    if std::os::unix::fs::MetadataExt::uid(
        &std::fs::metadata(&root).unwrap_or_else(|e| panic!("{e}")),
    ) == 0
    {
        let theirs = root.join("theirs.py");
        std::fs::write(&theirs, "x = 1\n").unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::chown(&theirs, Some(1000), None).unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::symlink(&theirs, folder.join("lib.py"))
            .unwrap_or_else(|e| panic!("{e}"));
        let found = problems(vec![entry(greet.clone(), "")]);
        assert!(
            found
                .iter()
                .any(|m| m.contains("lib.py in the plugin's folder links to")
                    && m.contains("belongs to user 1000")),
            "{found:?}"
        );
        std::fs::remove_file(folder.join("lib.py")).unwrap_or_else(|e| panic!("{e}"));
    }
    // A directory above it that others may write, without the sticky bit.
    std::fs::set_permissions(&plugins, std::fs::Permissions::from_mode(0o777))
        .unwrap_or_else(|e| panic!("{e}"));
    let found = problems(vec![entry(greet, "")]);
    assert!(
        found.iter().any(|m| m.contains("without the sticky bit")),
        "{found:?}"
    );
}
