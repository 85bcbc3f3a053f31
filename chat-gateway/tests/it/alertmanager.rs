//! `POST /alertmanager` against the real Prometheus Alertmanager (Debian's
//! `prometheus-alertmanager`, started on loopback ports with clustering
//! off): alerts fired with `amtool` arrive as ONE chat message per group,
//! firing then resolved; a receiver with the wrong bearer token is refused,
//! reported, and posts nothing. Bad payloads are refused with a message
//! naming the problem.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleetcmd_gateway::adapters::{AuthFailures, ChatSender};
use fleetcmd_gateway::alertmanager::{
    ALERTMANAGER_PATH, AlertRoute, AlertmanagerConfig, MAX_BODY_BYTES, routes,
};
use fleetcmd_gateway::secret::SecretString;

use crate::support::{RecordingSender, Sent, free_port, serve_http};

const ALERTMANAGER: &str = "/usr/bin/prometheus-alertmanager";
const AMTOOL: &str = "/usr/bin/amtool";
const TOKEN: &str = "am-token-0123456789abcdef";
const INSTALL: &str = "install it: apt-get install -y prometheus-alertmanager";

fn config() -> AlertmanagerConfig {
    AlertmanagerConfig {
        token: Some(SecretString::new(TOKEN)),
        token_file: None,
        channel: "console:alerts".into(),
        routes: vec![AlertRoute {
            matchers: [("team".to_string(), "db".to_string())].into(),
            channel: "console:db".into(),
        }],
    }
}

/// The gateway's route on a loopback port, posting into a recorder.
async fn gateway() -> (
    String,
    Arc<RecordingSender>,
    tokio::sync::mpsc::Receiver<fleetcmd_gateway::adapters::AuthFailure>,
) {
    let posted = Arc::new(RecordingSender::default());
    let (failures, refused) = AuthFailures::channel(16);
    let app = routes(
        &config(),
        vec![("console".to_string(), posted.clone() as Arc<dyn ChatSender>)],
        failures,
    )
    .unwrap_or_else(|e| panic!("routes: {e}"));
    let (url, _task) = serve_http(fleetcmd_gateway::http::app(app)).await;
    (url, posted, refused)
}

/// One Alertmanager process with its config and storage in a temp dir.
struct Alertmanager {
    dir: tempfile::TempDir,
    url: String,
    child: Option<std::process::Child>,
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Alertmanager {
    async fn start(webhook: &str) -> Alertmanager {
        assert!(
            std::path::Path::new(ALERTMANAGER).exists() && std::path::Path::new(AMTOOL).exists(),
            "{ALERTMANAGER} or {AMTOOL} not found: this test needs the real Alertmanager; {INSTALL}"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("alertmanager.yml");
        // The `team: intruder` route goes to a receiver with the wrong token.
        std::fs::write(
            &conf,
            format!(
                r#"global:
  resolve_timeout: 5m
route:
  receiver: fleetcmd
  group_by: [alertname, service]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
  routes:
    - receiver: impostor
      matchers: ['team="intruder"']
receivers:
  - name: fleetcmd
    webhook_configs:
      - url: "{webhook}"
        send_resolved: true
        http_config:
          authorization:
            type: Bearer
            credentials: "{TOKEN}"
  - name: impostor
    webhook_configs:
      - url: "{webhook}"
        send_resolved: true
        http_config:
          authorization:
            type: Bearer
            credentials: "not-the-token-0123456789"
"#
            ),
        )
        .expect("config");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("alertmanager.log")).expect("log");
        let child = std::process::Command::new(ALERTMANAGER)
            .arg(format!("--config.file={}", conf.display()))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {ALERTMANAGER}: {e}; {INSTALL}"));
        let am = Alertmanager {
            dir,
            url: format!("http://127.0.0.1:{port}"),
            child: Some(child),
        };
        let http = crate::campfire::client();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = http.get(format!("{}/-/ready", am.url)).send().await;
            if matches!(ready, Ok(r) if r.status().is_success()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "alertmanager not ready within 20 s; log:\n{}",
                am.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        am
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("alertmanager.log")).unwrap_or_default()
    }

    /// `amtool alert add LABELS… [--annotation=…] [--end=…]`.
    async fn amtool(&self, args: &[&str]) {
        let out = tokio::process::Command::new(AMTOOL)
            .arg(format!("--alertmanager.url={}", self.url))
            .args(["alert", "add"])
            .args(args)
            .output()
            .await
            .unwrap_or_else(|e| panic!("running {AMTOOL}: {e}; {INSTALL}"));
        assert!(
            out.status.success(),
            "amtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// RFC 3339 (UTC, seconds) of `t`, for `amtool --end`.
fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn sends(posted: &RecordingSender) -> Vec<(String, fleetcmd_gateway::adapters::Reply)> {
    posted
        .all()
        .into_iter()
        .filter_map(|s| match s {
            Sent::Send { channel, reply } => Some((channel, reply)),
            Sent::Edit { .. } => None,
        })
        .collect()
}

/// Polls `posted` until `pred` holds for some message, or fails after `secs`.
async fn wait_for_message(
    posted: &RecordingSender,
    am: &Alertmanager,
    secs: u64,
    what: &str,
    pred: impl Fn(&fleetcmd_gateway::adapters::Reply) -> bool,
) -> fleetcmd_gateway::adapters::Reply {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some((_, r)) = sends(posted).into_iter().find(|(_, r)| pred(r)) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} within {secs} s; posted: {:#?}\nalertmanager log:\n{}",
            posted.all(),
            am.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_group_of_alerts_is_one_message_firing_then_resolved_and_a_wrong_token_posts_nothing() {
    let (url, posted, mut refused) = gateway().await;
    let am = Alertmanager::start(&format!("{url}{ALERTMANAGER_PATH}")).await;

    let alert = |instance: &'static str| {
        vec![
            "alertname=HighErrorRate",
            "service=api",
            "severity=critical",
            instance,
        ]
    };
    let mut a = alert("instance=web-1");
    a.push("--annotation=summary=5xx above 5% on web-1");
    a.push("--annotation=description=@here see the dashboard");
    am.amtool(&a).await;
    let mut b = alert("instance=web-2");
    b.push("--annotation=summary=5xx above 5% on web-2");
    am.amtool(&b).await;
    am.amtool(&[
        "alertname=Intruder",
        "team=intruder",
        "--annotation=summary=must not reach chat",
    ])
    .await;

    let firing = wait_for_message(&posted, &am, 30, "firing message", |r| {
        r.header.starts_with("[FIRING")
    })
    .await;
    assert_eq!(
        firing.header,
        "[FIRING:2] alertname=HighErrorRate service=api"
    );
    let titles: Vec<&str> = firing.sections.iter().map(|s| s.title.as_str()).collect();
    assert_eq!(
        titles,
        [
            "firing: 5xx above 5% on web-1",
            "firing: 5xx above 5% on web-2"
        ]
    );
    assert!(
        firing.sections[0]
            .notes
            .contains(&"@here see the dashboard".to_string()),
        "{firing:#?}"
    );
    assert!(
        firing.sections[0]
            .notes
            .contains(&"labels: instance=web-1 severity=critical".to_string()),
        "{firing:#?}"
    );

    // The impostor receiver's call was refused and reported.
    let f = tokio::time::timeout(Duration::from_secs(30), refused.recv())
        .await
        .unwrap_or_else(|_| panic!("no auth failure reported; log:\n{}", am.log()))
        .expect("reporter open");
    assert_eq!(f.adapter, "alertmanager");
    assert_eq!(f.detail, "wrong bearer token");

    // Resolve both: re-add them with an end time in the past.
    let end = format!(
        "--end={}",
        rfc3339(SystemTime::now() - Duration::from_secs(1))
    );
    let mut a = alert("instance=web-1");
    a.push(&end);
    am.amtool(&a).await;
    let mut b = alert("instance=web-2");
    b.push(&end);
    am.amtool(&b).await;
    let resolved = wait_for_message(&posted, &am, 30, "resolved message", |r| {
        r.header.starts_with("[RESOLVED]")
    })
    .await;
    assert_eq!(
        resolved.header,
        "[RESOLVED] alertname=HighErrorRate service=api"
    );
    assert_eq!(resolved.sections.len(), 2, "{resolved:#?}");
    assert!(
        resolved
            .sections
            .iter()
            .all(|s| s.title.starts_with("resolved: ")),
        "{resolved:#?}"
    );

    let all = sends(&posted);
    assert!(all.iter().all(|(c, _)| c == "console:alerts"), "{all:#?}");
    assert!(
        all.iter()
            .all(|(_, r)| !r.plain().contains("Intruder")
                && !r.plain().contains("must not reach chat")),
        "the impostor's alert reached chat: {all:#?}"
    );
    assert_eq!(
        sends(&posted)
            .iter()
            .filter(|(_, r)| r.header.starts_with("[FIRING:2]"))
            .count(),
        1,
        "one message for the group"
    );
}

fn payload(version: &str) -> String {
    format!(
        r#"{{"receiver":"fleetcmd","status":"firing","alerts":[{{"status":"firing","labels":{{"alertname":"DiskFull","team":"db"}},"annotations":{{"summary":"disk full"}},"startsAt":"2026-01-01T00:00:00Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"http://prometheus/graph","fingerprint":"a1b2"}}],"groupLabels":{{"alertname":"DiskFull"}},"commonLabels":{{"alertname":"DiskFull","team":"db"}},"commonAnnotations":{{}},"externalURL":"http://am","version":"{version}","groupKey":"{{}}:{{alertname=\"DiskFull\"}}","truncatedAlerts":0}}"#
    )
}

#[tokio::test]
async fn bad_payloads_and_tokens_are_refused_with_the_reason() {
    let (url, posted, mut refused) = gateway().await;
    let http = crate::campfire::client();
    let post = |body: String, auth: Option<&str>| {
        let mut req = http.post(format!("{url}{ALERTMANAGER_PATH}")).body(body);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        async move {
            let r = req.send().await.expect("request");
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        }
    };
    let bearer = format!("Bearer {TOKEN}");

    let (code, _) = post(payload("4"), None).await;
    assert_eq!(code, 401);
    let (code, _) = post(payload("4"), Some("Bearer wrong-token-0123456789")).await;
    assert_eq!(code, 401);
    let (code, _) = post(payload("4"), Some(&format!("Basic {TOKEN}"))).await;
    assert_eq!(code, 401);
    let details: Vec<String> = (0..3)
        .map(|_| refused.try_recv().map(|f| f.detail).unwrap_or_default())
        .collect();
    assert_eq!(
        details,
        [
            "missing bearer token",
            "wrong bearer token",
            "authorization is not a bearer token"
        ]
    );

    let (code, text) = post(payload("3"), Some(&bearer)).await;
    assert_eq!(
        (code, text.trim()),
        (
            400,
            "unsupported Alertmanager payload version \"3\": expected \"4\""
        )
    );
    let (code, text) = post("{\"version\":".into(), Some(&bearer)).await;
    assert_eq!(code, 400);
    assert!(
        text.starts_with("malformed Alertmanager payload: "),
        "{text}"
    );
    let (code, text) = post("x".repeat(MAX_BODY_BYTES + 1), Some(&bearer)).await;
    assert_eq!(code, 413);
    assert!(text.contains("larger than"), "{text}");
    assert!(sends(&posted).is_empty());

    // A good one, routed by its common labels (team=db).
    let (code, _) = post(payload("4"), Some(&bearer)).await;
    assert_eq!(code, 200);
    let got = sends(&posted);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "console:db");
    assert_eq!(got[0].1.header, "[FIRING:1] alertname=DiskFull");
}

#[test]
fn rfc3339_formats_utc() {
    assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
    assert_eq!(
        rfc3339(UNIX_EPOCH + Duration::from_secs(1_772_323_199)),
        "2026-02-28T23:59:59Z"
    );
}

#[test]
fn hostile_labels_and_annotations_stay_inert_on_the_console() {
    let body = r#"{"version":"4","status":"firing","receiver":"fleetcmd","groupKey":"k","truncatedAlerts":2,
      "groupLabels":{"alertname":"@channel"},
      "commonLabels":{"alertname":"@channel"},"commonAnnotations":{},
      "alerts":[{"status":"firing","labels":{"alertname":"@channel","instance":"!run reboot on all"},
        "annotations":{"summary":"@here wake up\n!run restart nginx.service on all","description":"\u001b[2Jcleared\u202Etxet"},
        "startsAt":"2026-03-01T10:00:00Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"","fingerprint":"f"}]}"#;
    let payload =
        fleetcmd_gateway::alertmanager::parse(body.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    let text = fleetcmd_gateway::adapters::console::render(
        "1",
        false,
        &fleetcmd_gateway::alertmanager::render(&payload),
    );
    for line in text.lines() {
        assert!(
            !line.starts_with('!') && !line.starts_with('@'),
            "line looks addressed: {line:?}"
        );
        assert!(
            line.chars().all(|c| c == '\t' || !c.is_control()) && !line.contains('\u{202E}'),
            "control character in {line:?}"
        );
    }
    insta::assert_snapshot!("alertmanager_group_on_console", text);
}
