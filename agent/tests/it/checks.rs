//! Health checks against real things on loopback: a TCP listener, HTTP and
//! HTTPS servers (throwaway CA), Nagios plugins as shell scripts, a fake
//! systemctl (there is no systemd PID 1 in the test container), the host's
//! own disks, load and memory; and results travelling in heartbeats to the
//! real controller, which a slow check does not delay.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetcmd_agent::checks::config::{RawCheck, validate_checks};
use fleetcmd_agent::checks::{Check, CheckConfig, CheckRunner};
use fleetcmd_proto::v1 as pb;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

// ------------------------------------------------------------------ helpers

fn configs(text: &str) -> Vec<CheckConfig> {
    #[derive(serde::Deserialize)]
    struct File {
        check: Vec<RawCheck>,
    }
    let file: File = toml::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
    let mut problems = Vec::new();
    let checks = validate_checks(&file.check, &mut problems);
    assert!(problems.is_empty(), "{text}: {problems:?}");
    checks
}

/// Runs the single check in `text` once.
async fn run(text: &str) -> pb::CheckResult {
    let mut checks = configs(text);
    assert_eq!(checks.len(), 1);
    Check::new(checks.remove(0)).run().await
}

fn state(r: &pb::CheckResult) -> pb::CheckState {
    pb::CheckState::try_from(r.state).unwrap_or(pb::CheckState::Unspecified)
}

#[track_caller]
fn assert_state(r: &pb::CheckResult, expected: pb::CheckState, summary_has: &str) {
    assert_eq!(state(r), expected, "{r:?}");
    assert!(
        r.summary.contains(summary_has),
        "summary {:?} lacks {summary_has:?}",
        r.summary
    );
    assert!(r.checked_at_ms > 0, "{r:?}");
}

/// Polls `f` until it returns Some, or panics after `limit`.
async fn eventually<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An executable shell script in `dir`.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

fn nagios(name: &str, program: &Path, extra: &str) -> String {
    format!(
        "[[check]]\nname = \"{name}\"\nkind = \"nagios\"\ncommand = [{:?}]\n{extra}\n",
        program.display().to_string()
    )
}

// ------------------------------------------------------------------ tcp

#[tokio::test]
async fn tcp_open_port_is_ok_with_connect_time_and_a_closed_one_critical() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let open = listener.local_addr().expect("addr");
    let r = run(&format!(
        "[[check]]\nname = \"db\"\nkind = \"tcp\"\naddress = \"{open}\"\n"
    ))
    .await;
    assert_state(&r, pb::CheckState::Ok, "TCP OK");
    assert_eq!((r.name.as_str(), r.kind.as_str()), ("db", "tcp"));
    let time = &r.perfdata[0];
    assert_eq!((time.label.as_str(), time.unit.as_str()), ("time", "s"));
    assert!(time.value >= 0.0 && time.value < 5.0, "{time:?}");

    // A port that was just free: nothing listens there.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    let r = run(&format!(
        "[[check]]\nname = \"db\"\nkind = \"tcp\"\naddress = \"{closed}\"\n"
    ))
    .await;
    assert_state(&r, pb::CheckState::Critical, "refused");
    assert!(r.summary.contains(&closed.to_string()), "{r:?}");
    drop(listener);
}

// ------------------------------------------------------------------ http(s)

/// A tiny HTTP/1.1 server: `/ok` 200 with a body, `/fail` 500, `/slow`
/// answers after 30 s, `/redirect` 302. One request per connection.
async fn http_server(
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let tls = tls.clone();
            conns.spawn(async move {
                match tls {
                    Some(acceptor) => {
                        if let Ok(s) = acceptor.accept(stream).await {
                            serve(s).await;
                        }
                    }
                    None => serve(stream).await,
                }
            });
        }
    });
    (addr, task)
}

async fn serve(mut s: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin) {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&req);
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let (status, body) = match path.as_str() {
        "/ok" => ("200 OK", "all good: ready\n"),
        "/fail" => ("500 Internal Server Error", "boom\n"),
        "/redirect" => ("302 Found", ""),
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            ("200 OK", "late\n")
        }
        _ => ("404 Not Found", "no\n"),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\nlocation: /ok\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(response.as_bytes()).await;
    let _ = s.shutdown().await;
}

fn http_check(url: &str, extra: &str) -> String {
    format!(
        "[[check]]\nname = \"web\"\nkind = \"http\"\nurl = \"{url}\"\ninterval = \"10s\"\ntimeout = \"1s\"\n{extra}\n"
    )
}

#[tokio::test]
async fn http_status_body_and_timeout() {
    let (addr, server) = http_server(None).await;
    let base = format!("http://{addr}");

    let r = run(&http_check(
        &format!("{base}/ok"),
        "body_contains = \"good\"\nbody_regex = \"^all .*ready\"",
    ))
    .await;
    assert_state(&r, pb::CheckState::Ok, "HTTP OK - 200 OK - 16 bytes");
    let labels: Vec<(&str, &str)> = r
        .perfdata
        .iter()
        .map(|p| (p.label.as_str(), p.unit.as_str()))
        .collect();
    assert_eq!(labels, [("time", "s"), ("size", "B")]);
    assert_eq!(r.perfdata[1].value, 16.0);

    let r = run(&http_check(
        &format!("{base}/ok"),
        "body_contains = \"missing\"",
    ))
    .await;
    assert_state(
        &r,
        pb::CheckState::Critical,
        "body does not contain \"missing\"",
    );
    let r = run(&http_check(&format!("{base}/ok"), "body_regex = \"^nope\"")).await;
    assert_state(&r, pb::CheckState::Critical, "body does not match /^nope/");

    let r = run(&http_check(&format!("{base}/fail"), "")).await;
    assert_state(
        &r,
        pb::CheckState::Critical,
        "status 500 Internal Server Error, expected 200-399",
    );
    let r = run(&http_check(
        &format!("{base}/fail"),
        "expect_status = [500]",
    ))
    .await;
    assert_state(&r, pb::CheckState::Ok, "HTTP OK - 500");
    // Redirects are not followed: the 302 is the answer.
    let r = run(&http_check(
        &format!("{base}/redirect"),
        "expect_status = \"200\"",
    ))
    .await;
    assert_state(
        &r,
        pb::CheckState::Critical,
        "status 302 Found, expected 200",
    );

    let started = Instant::now();
    let r = run(&http_check(&format!("{base}/slow"), "")).await;
    assert_state(&r, pb::CheckState::Critical, "timed out after 1s");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    server.abort();
    let r = run(&http_check(&format!("http://{addr}/ok"), "")).await;
    assert_state(&r, pb::CheckState::Critical, "HTTP CRITICAL");
}

#[tokio::test]
async fn https_is_verified_against_ca_file_and_refused_without_it() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    // A throwaway CA and a server certificate for 127.0.0.1.
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = rcgen::KeyPair::generate().expect("key");
    let server_cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("params")
        .signed_by(&server_key, &issuer)
        .expect("server cert");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).expect("write ca");

    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![server_cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
    )
    .expect("server config");
    let (addr, server) = http_server(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await;
    let url = format!("https://{addr}/ok");

    let r = run(&http_check(
        &url,
        &format!("ca_file = {:?}", ca_file.display().to_string()),
    ))
    .await;
    assert_state(&r, pb::CheckState::Ok, "HTTP OK - 200 OK");
    // Public roots only: the private CA is not trusted.
    let r = run(&http_check(&url, "")).await;
    assert_state(&r, pb::CheckState::Critical, "HTTP CRITICAL");
    assert!(r.summary.to_lowercase().contains("certificate"), "{r:?}");
    server.abort();
}

// ------------------------------------------------------------------ nagios

#[tokio::test]
async fn nagios_exit_codes_map_to_states_with_perfdata() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "ok",
            "echo 'DISK OK - free space: / 3326 MB (56%) | /=2643MB;5948;5958;0;5968'\nexit 0",
            pb::CheckState::Ok,
            "DISK OK - free space: / 3326 MB (56%)",
        ),
        (
            "warning",
            "echo 'LOAD WARNING - high'\nexit 1",
            pb::CheckState::Warning,
            "LOAD WARNING - high",
        ),
        (
            "critical",
            "echo 'HTTP CRITICAL - down'\nexit 2",
            pb::CheckState::Critical,
            "HTTP CRITICAL - down",
        ),
        (
            "unknown",
            "echo 'UNKNOWN - bad args'\nexit 3",
            pb::CheckState::Unknown,
            "UNKNOWN - bad args",
        ),
        (
            "other",
            "echo 'crashed'\nexit 7",
            pb::CheckState::Unknown,
            "exit status 7: crashed",
        ),
        (
            "signal",
            "echo 'dying'\nkill -9 $$",
            pb::CheckState::Unknown,
            "killed by signal 9",
        ),
        (
            "silent",
            "echo 'usage: oops' >&2\nexit 2",
            pb::CheckState::Critical,
            "usage: oops",
        ),
    ];
    for (name, body, expected, summary) in cases {
        let program = script(dir.path(), name, body);
        let r = run(&nagios(name, &program, "")).await;
        assert_eq!(state(&r), expected, "{name}: {r:?}");
        // A signal's summary also names the program.
        assert!(
            r.summary == summary || (name == "signal" && r.summary.ends_with(summary)),
            "{name}: {:?}",
            r.summary
        );
        assert_eq!(r.kind, "nagios");
    }
    let program = script(
        dir.path(),
        "perf",
        "echo 'OK - fine | time=0.5s;1;2;0;10 bad=x'\necho 'detail | size=12B'\nexit 0",
    );
    let r = run(&nagios("perf", &program, "")).await;
    let perf: Vec<(&str, f64, &str, &str, &str)> = r
        .perfdata
        .iter()
        .map(|p| {
            (
                p.label.as_str(),
                p.value,
                p.unit.as_str(),
                p.warn.as_str(),
                p.crit.as_str(),
            )
        })
        .collect();
    assert_eq!(
        perf,
        [("time", 0.5, "s", "1", "2"), ("size", 12.0, "B", "", "")]
    );
    assert_eq!(
        (r.perfdata[0].min, r.perfdata[0].max),
        (Some(0.0), Some(10.0))
    );

    let r = run(&nagios("missing", &dir.path().join("nope"), "")).await;
    assert_state(&r, pb::CheckState::Unknown, "nope");
}

#[tokio::test]
async fn nagios_environment_is_cleared_then_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let program = script(
        dir.path(),
        "env",
        "echo \"OK - foo=$FOO home=${HOME:-unset} path=$PATH\"",
    );
    let r = run(&nagios("env", &program, "env = { FOO = \"bar baz\" }")).await;
    assert_state(
        &r,
        pb::CheckState::Ok,
        "OK - foo=bar baz home=unset path=/usr/local/sbin:",
    );
}

#[tokio::test]
async fn a_plugin_that_hangs_is_killed_with_its_children_and_reported_unknown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("child.pid");
    let program = script(
        dir.path(),
        "hang",
        &format!("sleep 300 &\necho $! > {}\nsleep 300", pid_file.display()),
    );
    let started = Instant::now();
    let r = run(&nagios(
        "hang",
        &program,
        "interval = \"5s\"\ntimeout = \"1s\"",
    ))
    .await;
    assert_state(&r, pb::CheckState::Unknown, "timed out after 1s");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .expect("the plugin started its child")
        .trim()
        .parse()
        .expect("pid");
    // Gone, or a zombie waiting for init to reap it.
    eventually(
        Duration::from_secs(5),
        "the plugin's child is killed",
        || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next()
                .unwrap_or("");
            (stat.is_empty() || state == "Z").then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn plugin_output_is_capped() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 1 MiB of long output between perfdata on the first line and perfdata
    // after it: only what fits in the first 64 KiB is read.
    let program = script(
        dir.path(),
        "flood",
        "echo 'OK - flood | early=1'\nhead -c 1048576 /dev/zero | tr '\\0' 'x'\necho\necho '| late=2'\nexit 0",
    );
    let r = run(&nagios("flood", &program, "")).await;
    assert_state(&r, pb::CheckState::Ok, "OK - flood");
    let labels: Vec<&str> = r.perfdata.iter().map(|p| p.label.as_str()).collect();
    assert_eq!(labels, ["early"], "perfdata beyond the cap is not read");

    // A huge first line: the summary stays one bounded line.
    let program = script(
        dir.path(),
        "wide",
        "head -c 100000 /dev/zero | tr '\\0' 'y'\necho\nexit 1",
    );
    let r = run(&nagios("wide", &program, "")).await;
    assert_eq!(state(&r), pb::CheckState::Warning);
    assert!(r.summary.len() <= 520, "{}", r.summary.len());
}

// ------------------------------------------------------------------ host thresholds

#[tokio::test]
async fn disk_load_and_memory_thresholds() {
    let check = |kind: &str, extra: &str| {
        format!("[[check]]\nname = \"{kind}\"\nkind = \"{kind}\"\n{extra}\n")
    };
    // Used above 0 % on any real file system: WARNING; above 0 as crit wins.
    let r = run(&check("disk", "warn = \"0%\"")).await;
    assert_state(&r, pb::CheckState::Warning, "DISK WARNING");
    assert!(
        !r.perfdata.is_empty() && r.perfdata.iter().all(|p| p.unit == "%" && p.warn == "0"),
        "{r:?}"
    );
    let r = run(&check("disk", "warn = \"0%\"\ncrit = \"0%\"")).await;
    assert_state(&r, pb::CheckState::Critical, "DISK CRITICAL");
    let r = run(&check("disk", "warn = \"100%\"")).await;
    assert_state(&r, pb::CheckState::Ok, "DISK OK");
    let r = run(&check("disk", "mount = \"/no/such/mount\"\nwarn = \"80%\"")).await;
    assert_state(
        &r,
        pb::CheckState::Unknown,
        "/no/such/mount is not a mounted file system",
    );

    // `@0:` alerts for any load at all; a huge limit never does.
    let r = run(&check("load", "warn = \"@0:\"")).await;
    assert_state(&r, pb::CheckState::Warning, "LOAD WARNING - load average");
    let labels: Vec<&str> = r.perfdata.iter().map(|p| p.label.as_str()).collect();
    assert_eq!(labels, ["load1", "load5", "load15"]);
    let r = run(&check(
        "load",
        "warn = \"1000000\"\ncrit = \"@0:,1000000,1000000\"\nper_cpu = true",
    ))
    .await;
    assert_state(&r, pb::CheckState::Critical, "CPUs)");

    let r = run(&check("memory", "warn = \"0%\"")).await;
    assert_state(&r, pb::CheckState::Warning, "MEMORY WARNING");
    let r = run(&check("memory", "warn = \"100%\"\ncrit = \"100%\"")).await;
    assert_state(&r, pb::CheckState::Ok, "MEMORY OK");
    assert_eq!(r.perfdata[0].label, "used_percent");
}

// ------------------------------------------------------------------ systemd

#[tokio::test]
async fn systemd_states_from_a_fake_systemctl() {
    // No systemd in the test container: a script answers like
    // `systemctl show --property=LoadState,ActiveState,SubState -- UNIT`.
    let dir = tempfile::tempdir().expect("tempdir");
    let args = dir.path().join("args");
    let fake = script(
        dir.path(),
        "systemctl",
        &format!(
            "echo \"$@\" > {}\n\
             case \"$4\" in\n\
             nginx.service) printf 'LoadState=loaded\\nActiveState=active\\nSubState=running\\n' ;;\n\
             starting.service) printf 'LoadState=loaded\\nActiveState=activating\\nSubState=start\\n' ;;\n\
             broken.service) printf 'LoadState=loaded\\nActiveState=failed\\nSubState=failed\\n' ;;\n\
             ghost.service) printf 'LoadState=not-found\\nActiveState=inactive\\nSubState=dead\\n' ;;\n\
             error.service) echo 'Failed to connect to bus' >&2; exit 1 ;;\n\
             *) printf 'ActiveState=maintenance\\n' ;;\n\
             esac",
            args.display()
        ),
    );
    let check = |unit: &str, systemctl: &Path| {
        format!(
            "[[check]]\nname = \"svc\"\nkind = \"systemd\"\nunit = \"{unit}\"\nsystemctl = {:?}\n",
            systemctl.display().to_string()
        )
    };
    for (unit, expected, summary) in [
        (
            "nginx.service",
            pb::CheckState::Ok,
            "nginx.service active (running)",
        ),
        (
            "starting.service",
            pb::CheckState::Warning,
            "starting.service activating (start)",
        ),
        (
            "broken.service",
            pb::CheckState::Critical,
            "broken.service failed (failed)",
        ),
        (
            "ghost.service",
            pb::CheckState::Critical,
            "ghost.service: unit not found",
        ),
        (
            "odd.service",
            pb::CheckState::Unknown,
            "odd.service maintenance",
        ),
        (
            "error.service",
            pb::CheckState::Unknown,
            "Failed to connect to bus",
        ),
    ] {
        let r = run(&check(unit, &fake)).await;
        assert_state(&r, expected, summary);
    }
    assert_eq!(
        std::fs::read_to_string(&args).expect("args").trim(),
        "show --property=LoadState,ActiveState,SubState -- error.service"
    );
    let r = run(&check("nginx.service", &dir.path().join("no-systemctl"))).await;
    assert_state(&r, pb::CheckState::Unknown, "no-systemctl");
}

// ------------------------------------------------------------------ runner

#[tokio::test]
async fn a_running_check_reports_its_previous_result() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = dir.path().join("first-done");
    let second = dir.path().join("second-running");
    // First run: quick OK. Second run: says it started, then hangs until
    // its timeout.
    let program = script(
        dir.path(),
        "flip",
        &format!(
            "if [ -e {first} ]; then touch {second}; sleep 300; fi\ntouch {first}\necho 'OK - first run'",
            first = first.display(),
            second = second.display()
        ),
    );
    let runner = CheckRunner::start(configs(&nagios(
        "flip",
        &program,
        "interval = \"1s\"\ntimeout = \"900ms\"",
    )));
    let latest = runner.latest();
    eventually(Duration::from_secs(10), "the second run starts", || {
        second.exists().then_some(())
    })
    .await;
    let during = latest.snapshot();
    assert_eq!(during.len(), 1, "{during:?}");
    assert_state(&during[0], pb::CheckState::Ok, "OK - first run");
    eventually(Duration::from_secs(10), "the hung run times out", || {
        latest
            .snapshot()
            .first()
            .filter(|r| state(r) == pb::CheckState::Unknown)
            .cloned()
    })
    .await;
    runner.shutdown().await;
}

// ------------------------------------------------------------------ heartbeats

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_reach_the_controller_in_heartbeats_and_a_slow_check_does_not_delay_them() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let root = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
        .expect("key");
    let root = fleetcmd_core::crypto::SigningKey::from_pkcs8_der(root.as_ref()).expect("key");
    let heartbeat = Duration::from_secs(1);
    let controller = fleetcmd_controller::start(fleetcmd_controller::ControllerConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.path().join("controller"),
        tls_names: Vec::new(),
        policy_roots: vec![root.public_key()],
        policy_threshold: 1,
        agent_cert_ttl: Duration::from_secs(3600),
        operator_cert_ttl: Duration::from_secs(7 * 86400),
        gateway_cert_ttl: Duration::from_secs(30 * 86400),
        heartbeat_interval: heartbeat,
        job_retention: Duration::from_secs(86400),
        job_store_max_bytes: 1 << 30,
        audit_export: Vec::new(),
        audit_retention: None,
        store_cache_bytes: fleetcmd_controller::store::DEFAULT_CACHE_BYTES,
        postgres: None,
        embedded: Default::default(),
        services: Vec::new(),
        host_alerts: None,
        metrics_listen: None,
    })
    .await
    .expect("controller starts");
    let url = format!("https://{}", controller.addr());
    let shared = controller.shared().clone();
    let (token, _) = shared
        .create_token(
            Default::default(),
            Duration::from_secs(600),
            1,
            Some("web-1".into()),
            "test",
        )
        .await
        .expect("token");
    let state_dir = dir.path().join("agent");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    fleetcmd_agent::join(
        &fleetcmd_agent::JoinOptions {
            controller: url.clone(),
            token: token.expose().clone(),
            name: "web-1".into(),
            state_dir: state_dir.clone(),
        },
        now,
    )
    .await
    .expect("join");

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    // Hangs for its whole timeout (3 s), every 4 s: if heartbeats waited
    // for checks, they would be seconds late.
    let slow = script(dir.path(), "slow", "sleep 300");
    let checks = configs(&format!(
        "[[check]]\nname = \"port\"\nkind = \"tcp\"\naddress = \"{addr}\"\ninterval = \"1s\"\ntimeout = \"500ms\"\n{}",
        nagios("slow", &slow, "interval = \"4s\"\ntimeout = \"3s\"")
    ));
    let agent = fleetcmd_agent::spawn(fleetcmd_agent::AgentConfig {
        controllers: fleetcmd_agent::controllers::Controllers::one(&url).expect("loopback url"),
        state_dir,
        facts: Default::default(),
        allow: None,
        max_output_bytes: 1 << 20,
        max_concurrent_jobs: 4,
        checks,
        metrics_listen: None,
    })
    .expect("agent starts");

    let agent_view = || {
        shared
            .registry
            .list_agents("")
            .ok()
            .and_then(|l| l.into_iter().find(|a| a.agent_id == "web-1"))
    };
    let port = eventually(
        Duration::from_secs(20),
        "the tcp check in a heartbeat",
        || agent_view().and_then(|a| a.checks.into_iter().find(|c| c.name == "port")),
    )
    .await;
    assert_state(&port, pb::CheckState::Ok, "TCP OK");
    assert_eq!(port.perfdata[0].label, "time");

    // While the slow check hangs and is killed, heartbeats keep coming.
    let window = Instant::now();
    let mut worst_age = 0u64;
    let mut slow_seen = None;
    while window.elapsed() < Duration::from_secs(7) {
        let a = agent_view().expect("agent listed");
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64;
        worst_age = worst_age.max(now_ms.saturating_sub(a.last_seen_ms));
        if let Some(c) = a.checks.into_iter().find(|c| c.name == "slow") {
            slow_seen = Some(c);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        worst_age < 2000,
        "a heartbeat was {worst_age} ms late (interval {heartbeat:?})"
    );
    let slow = match slow_seen {
        Some(s) => s,
        None => {
            eventually(Duration::from_secs(10), "the slow check's result", || {
                agent_view().and_then(|a| a.checks.into_iter().find(|c| c.name == "slow"))
            })
            .await
        }
    };
    assert_state(&slow, pb::CheckState::Unknown, "timed out after 3s");

    agent.shutdown().await;
    controller.shutdown().await.expect("controller stops");
    drop(listener);
}

// ------------------------------------------------------------------ deploy example

#[test]
fn every_commented_example_in_deploy_agent_toml_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml");
    let text = std::fs::read_to_string(&path).expect("deploy/agent.toml");
    let dir = tempfile::tempdir().expect("tempdir");
    // The example's private CA, so that `ca_file` can be read.
    let ca = rcgen::CertificateParams::new(Vec::<String>::new())
        .expect("params")
        .self_signed(&rcgen::KeyPair::generate().expect("key"))
        .expect("cert");
    let ca_file = dir.path().join("internal-ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("write ca");
    let example = regex::Regex::new(r"^# (\[\[check\]\]|[a-z_]+ = .*)$").expect("regex");
    let mut kinds = Vec::new();
    let uncommented: Vec<String> = text
        .lines()
        .map(|line| match example.captures(line) {
            Some(c) => {
                let line = c[1].replace(
                    "/etc/fleetcmd/internal-ca.pem",
                    &ca_file.display().to_string(),
                );
                if let Some(kind) = line.strip_prefix("kind = ") {
                    kinds.push(kind.trim_matches('"').to_owned());
                }
                line
            }
            // `controllers` is the alternative to `controller`: with the
            // example uncommented, the single address gives way to it.
            None if line.starts_with("controller = ") => format!("# {line}"),
            None => line.to_owned(),
        })
        .collect();
    assert!(
        uncommented.iter().any(|l| l.starts_with("controllers = [")),
        "the several-controllers example is checked too"
    );
    assert_eq!(
        kinds,
        ["systemd", "tcp", "http", "disk", "load", "memory", "nagios"],
        "one example per kind"
    );
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, uncommented.join("\n")).expect("write");
    let config = fleetcmd_agent::config::load(&file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.checks.len(), 7);
}
