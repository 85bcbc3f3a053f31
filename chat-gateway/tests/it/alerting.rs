//! Service alerts to PagerDuty (Events API v2), Opsgenie and Statuspage,
//! and chat `oncall` (PagerDuty REST), against one local fake that checks
//! the documented request bodies and auth headers and answers with the
//! documented success and error bodies. Retries are counted at the fake.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use fleetcmd_gateway::integrations::{
    AlertHook, GiveUp, Integrations, Opsgenie, OpsgenieConfig, PagerDuty, PagerDutyConfig,
    Statuspage, StatuspageConfig,
};
use fleetcmd_gateway::oncall::Oncall;
use fleetcmd_proto::v1;
use serde_json::{Value, json};
use v1::alert_event::Kind;

use crate::support::{ask, serve_http, world};

const ROUTING_KEY: &str = "R0UTINGKEY0123456789abcdef012345";
const GENIE_KEY: &str = "eb243592-faa2-4ba2-a551q-1afdf565c889";
const SP_KEY: &str = "sp-oauth-key-0123456789";
const PD_TOKEN: &str = "y_NbAkKc66ryYTWUXYEu";

/// One request the fake received.
#[derive(Clone, Debug)]
struct Req {
    api: &'static str,
    method: Method,
    path: String,
    query: String,
    auth: String,
    accept: String,
    body: Value,
}

#[derive(Default)]
struct Fake {
    log: Mutex<Vec<Req>>,
    /// Scripted answers per API, used before the default success.
    script: Mutex<HashMap<&'static str, VecDeque<(u16, String)>>>,
    /// APIs whose requests wait until released.
    held: Mutex<Vec<&'static str>>,
    release: tokio::sync::Notify,
}

impl Fake {
    fn requests(&self, api: &str) -> Vec<Req> {
        self.log
            .lock()
            .map(|l| l.iter().filter(|r| r.api == api).cloned().collect())
            .unwrap_or_default()
    }
    fn script(&self, api: &'static str, answers: &[(u16, &str)]) {
        let mut s = self.script.lock().unwrap_or_else(|p| p.into_inner());
        s.entry(api)
            .or_default()
            .extend(answers.iter().map(|(c, b)| (*c, b.to_string())));
    }
    fn clear(&self) {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

const PD_INVALID: &str = r#"{"status":"invalid event","message":"Event object is invalid","errors":["Length of 'routing_key' is incorrect (should be 32 characters)"]}"#;
const PD_THROTTLED: &str = r#"{"status":"throttle event","message":"Requests for this service are arriving too quickly.  Please retry later."}"#;
const OG_UNPROCESSABLE: &str = r#"{"message":"Request body is not processable. Please check the errors.","errors":{"message":"Message can not be empty."},"took":0.002,"requestId":"a1"}"#;
const OG_THROTTLED: &str = r#"{"message":"You are making too many requests! To avoid errors, we recommend you limit requests.","took":0.0,"requestId":"a2"}"#;

async fn handle(
    State(fake): State<Arc<Fake>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let api: &'static str = if path == "/v2/enqueue" {
        "pagerduty"
    } else if path.starts_with("/v2/alerts") {
        "opsgenie"
    } else if path.starts_with("/pages/") {
        "statuspage"
    } else if path == "/oncalls" {
        "oncall"
    } else {
        return (StatusCode::NOT_FOUND, "no such fake route").into_response();
    };
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap_or_else(|e| json!({ "unparsable": e.to_string() }))
    };
    let req = Req {
        api,
        method,
        path,
        query: uri.query().unwrap_or_default().to_string(),
        auth: header("authorization"),
        accept: header("accept"),
        body,
    };
    loop {
        let waiting = fake.release.notified();
        if !fake.held.lock().map(|h| h.contains(&api)).unwrap_or(false) {
            break;
        }
        waiting.await;
    }
    fake.log
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(req.clone());
    let scripted = fake
        .script
        .lock()
        .ok()
        .and_then(|mut s| s.get_mut(api).and_then(VecDeque::pop_front));
    let (code, text) = scripted.unwrap_or_else(|| match api {
        "pagerduty" => (
            202,
            json!({"status": "success", "message": "Event processed",
                   "dedup_key": req.body["dedup_key"]})
            .to_string(),
        ),
        "opsgenie" => (
            202,
            r#"{"result":"Request will be processed","took":0.302,"requestId":"43a29c5c-3dbf-4fa4-9c26-f4f71023e120"}"#
                .to_string(),
        ),
        "statuspage" => (
            200,
            json!({"id": "cmp1abc", "status": req.body["component"]["status"]}).to_string(),
        ),
        _ => (200, ONCALLS.to_string()),
    });
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [("content-type", "application/json")],
        text,
    )
        .into_response()
}

async fn fake() -> (String, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    let app = axum::Router::new()
        .fallback(handle)
        .with_state(fake.clone());
    let (url, _task) = serve_http(app).await;
    (url, fake)
}

fn pd_config(url: &str, extra: &str) -> PagerDutyConfig {
    toml::from_str(&format!(
        "routing_key = \"{ROUTING_KEY}\"\nurl = \"{url}/v2/enqueue\"\napi_url = \"{url}\"\n\
         api_token = \"{PD_TOKEN}\"\nbackoff_ms = 5\nmax_attempts = 4\n{extra}"
    ))
    .unwrap_or_else(|e| panic!("{e}"))
}

fn og_config(url: &str) -> OpsgenieConfig {
    toml::from_str(&format!(
        "api_key = \"{GENIE_KEY}\"\nurl = \"{url}\"\nbackoff_ms = 5\nmax_attempts = 4\n"
    ))
    .unwrap_or_else(|e| panic!("{e}"))
}

fn sp_config(url: &str) -> StatuspageConfig {
    toml::from_str(&format!(
        "api_key = \"{SP_KEY}\"\npage_id = \"pg1abc\"\nurl = \"{url}\"\nbackoff_ms = 5\n\
         max_attempts = 4\ncomponents = {{ web = \"cmp2web\" }}\n"
    ))
    .unwrap_or_else(|e| panic!("{e}"))
}

fn service(name: &str, state: &str) -> v1::Service {
    let passing = match state {
        "ok" => 2,
        "degraded" => 1,
        _ => 0,
    };
    let inst = |id: &str, ok: bool| v1::ServiceInstance {
        agent_id: id.into(),
        online: true,
        state: if ok {
            v1::CheckState::Ok
        } else {
            v1::CheckState::Critical
        } as i32,
        ..v1::ServiceInstance::default()
    };
    v1::Service {
        name: name.into(),
        state: state.into(),
        selector: "role=api".into(),
        passing,
        total: 2,
        instances: vec![inst("web-1", passing >= 1), inst("web-2", passing >= 2)],
        statuspage_component: if name == "api" {
            "cmp1abc".into()
        } else {
            String::new()
        },
        ..v1::Service::default()
    }
}

fn event(kind: Kind, name: &str, state: &str, silenced: bool) -> v1::AlertEvent {
    let s = service(name, state);
    v1::AlertEvent {
        kind: kind as i32,
        summary: format!(
            "{name} is {state}: {} of {} instances pass",
            s.passing, s.total
        ),
        service: Some(s),
        from: String::new(),
        silenced,
        at_ms: 1_700_000_000_000,
    }
}

async fn wait_until(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn pd_body(action: &str, severity: &str, summary: &str, passing: u32, instances: Value) -> Value {
    if action == "resolve" {
        return json!({"routing_key": ROUTING_KEY, "event_action": "resolve",
                      "dedup_key": "fleetcmd-api", "client": "fleetcmd"});
    }
    json!({
        "routing_key": ROUTING_KEY,
        "event_action": action,
        "dedup_key": "fleetcmd-api",
        "payload": {
            "summary": summary,
            "source": "fleetcmd",
            "severity": severity,
            "component": "api",
            "custom_details": {"passing": passing, "total": 2, "instances": instances},
        },
        "client": "fleetcmd",
    })
}

#[tokio::test]
async fn transitions_reach_every_integration_in_order_and_a_stuck_one_blocks_no_other() {
    let (url, fake) = fake().await;
    let ok = |e: String| -> AlertHook { panic!("{e}") };
    let integrations = Integrations {
        hooks: vec![
            PagerDuty::new(&pd_config(&url, ""))
                .unwrap_or_else(|e| panic!("{e}"))
                .map(AlertHook::of)
                .expect("routing key"),
            Opsgenie::new(&og_config(&url))
                .map(AlertHook::of)
                .unwrap_or_else(ok),
            Statuspage::new(&sp_config(&url))
                .map(AlertHook::of)
                .unwrap_or_else(ok),
        ],
    };
    // Statuspage hangs until released: the others must not wait for it.
    fake.held
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push("statuspage");
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let task = integrations.spawn(rx);
    for (state, from) in [("degraded", "ok"), ("down", "degraded"), ("ok", "down")] {
        let mut ev = event(Kind::Transition, "api", state, false);
        ev.from = from.into();
        tx.send(ev).await.expect("queue");
    }
    wait_until("pagerduty and opsgenie got all three", 10, || {
        fake.requests("pagerduty").len() == 3 && fake.requests("opsgenie").len() == 3
    })
    .await;
    assert!(fake.requests("statuspage").is_empty());

    let pd = fake.requests("pagerduty");
    assert!(
        pd.iter()
            .all(|r| r.method == Method::POST && r.path == "/v2/enqueue")
    );
    assert_eq!(
        pd[0].body,
        pd_body(
            "trigger",
            "warning",
            "api is degraded: 1 of 2 instances pass",
            1,
            json!({"web-1": "ok", "web-2": "critical"})
        )
    );
    assert_eq!(
        pd[1].body,
        pd_body(
            "trigger",
            "critical",
            "api is down: 0 of 2 instances pass",
            0,
            json!({"web-1": "critical", "web-2": "critical"})
        )
    );
    assert_eq!(pd[2].body, pd_body("resolve", "", "", 0, Value::Null));

    let og = fake.requests("opsgenie");
    assert!(og.iter().all(|r| r.auth == format!("GenieKey {GENIE_KEY}")));
    assert_eq!(
        (og[0].method.clone(), og[0].path.as_str()),
        (Method::POST, "/v2/alerts")
    );
    assert_eq!(
        og[0].body,
        json!({
            "message": "api is degraded: 1 of 2 instances pass",
            "alias": "fleetcmd-api",
            "description": "api is degraded: 1 of 2 instances pass\n1 of 2 instances pass (selector role=api)",
            "tags": ["fleetcmd", "service:api", "degraded"],
            "details": {"instance web-1": "ok", "instance web-2": "critical",
                        "passing": "1", "total": "2", "state": "degraded"},
            "entity": "api",
            "source": "fleetcmd",
            "priority": "P3",
        })
    );
    assert_eq!(og[1].body["priority"], "P1");
    assert_eq!(
        (og[2].path.as_str(), og[2].query.as_str()),
        ("/v2/alerts/fleetcmd-api/close", "identifierType=alias")
    );
    assert_eq!(
        og[2].body,
        json!({"source": "fleetcmd", "note": "api is ok again"})
    );

    // Released: Statuspage catches up, in order.
    fake.held.lock().unwrap_or_else(|p| p.into_inner()).clear();
    fake.release.notify_waiters();
    wait_until("statuspage got all three", 10, || {
        fake.requests("statuspage").len() == 3
    })
    .await;
    let sp = fake.requests("statuspage");
    let statuses: Vec<&Value> = sp.iter().map(|r| &r.body["component"]["status"]).collect();
    assert_eq!(
        statuses,
        [
            &json!("degraded_performance"),
            &json!("major_outage"),
            &json!("operational")
        ]
    );
    for r in &sp {
        assert_eq!(r.method, Method::PATCH);
        assert_eq!(r.path, "/pages/pg1abc/components/cmp1abc");
        assert_eq!(r.auth, format!("OAuth {SP_KEY}"));
    }
    drop(tx);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("integrations end when the stream ends")
        .expect("task");
}

#[tokio::test]
async fn snapshots_converge_silences_stop_pages_but_not_resolves_or_statuspage() {
    let (url, fake) = fake().await;
    let pd = PagerDuty::new(&pd_config(&url, ""))
        .unwrap_or_else(|e| panic!("{e}"))
        .expect("routing key");
    let og = Opsgenie::new(&og_config(&url)).unwrap_or_else(|e| panic!("{e}"));
    let sp = Statuspage::new(&sp_config(&url)).unwrap_or_else(|e| panic!("{e}"));
    let all = |ev: v1::AlertEvent| {
        let (pd, og, sp) = (&pd, &og, &sp);
        async move {
            (
                pd.send(&ev).await.is_some(),
                og.send(&ev).await.is_some(),
                sp.send(&ev).await.is_some(),
            )
        }
    };
    // After a restart the Watch starts with snapshots: level state is synced.
    assert_eq!(
        all(event(Kind::Snapshot, "api", "down", false)).await,
        (true, true, true)
    );
    assert_eq!(
        fake.requests("pagerduty")[0].body["event_action"],
        "trigger"
    );
    assert_eq!(
        all(event(Kind::Snapshot, "web", "ok", false)).await,
        (true, true, true)
    );
    let pd_log = fake.requests("pagerduty");
    assert_eq!(pd_log[1].body["event_action"], "resolve");
    assert_eq!(pd_log[1].body["dedup_key"], "fleetcmd-web");
    // `web` has no statuspage_component: the [statuspage] components map.
    assert_eq!(
        fake.requests("statuspage")[1].path,
        "/pages/pg1abc/components/cmp2web"
    );
    fake.clear();

    // Silenced: no page, but the status page still shows the outage…
    assert_eq!(
        all(event(Kind::Transition, "api", "down", true)).await,
        (false, false, true)
    );
    // …and recovery still resolves everywhere.
    assert_eq!(
        all(event(Kind::Transition, "api", "ok", true)).await,
        (true, true, true)
    );
    assert_eq!(fake.requests("pagerduty").len(), 1);
    assert_eq!(
        fake.requests("pagerduty")[0].body["event_action"],
        "resolve"
    );
    assert!(fake.requests("opsgenie")[0].path.ends_with("/close"));
    // Reminders and unknown states change nothing.
    assert_eq!(
        all(event(Kind::Reminder, "api", "down", false)).await,
        (false, false, false)
    );
    assert_eq!(
        all(event(Kind::Transition, "api", "unknown", false)).await,
        (false, false, false)
    );
}

#[tokio::test]
async fn pagerduty_retries_429_and_5xx_with_backoff_but_never_a_400() {
    let (url, fake) = fake().await;
    let pd = PagerDuty::new(&pd_config(&url, ""))
        .unwrap_or_else(|e| panic!("{e}"))
        .expect("routing key");
    fake.script(
        "pagerduty",
        &[(429, PD_THROTTLED), (500, ""), (502, "bad gateway")],
    );
    let r = pd
        .send(&event(Kind::Transition, "api", "down", false))
        .await;
    assert_eq!(
        r,
        Some(Ok("success Event processed dedup_key=fleetcmd-api".into()))
    );
    assert_eq!(fake.requests("pagerduty").len(), 4, "three retries");
    fake.clear();

    fake.script("pagerduty", &[(400, PD_INVALID)]);
    let r = pd.send(&event(Kind::Transition, "api", "ok", false)).await;
    assert_eq!(
        r,
        Some(Err(GiveUp::Refused {
            what: "pagerduty resolve api".into(),
            why: "400 Bad Request: invalid event: Event object is invalid (Length of 'routing_key' is incorrect (should be 32 characters))".into(),
        }))
    );
    assert_eq!(fake.requests("pagerduty").len(), 1, "a 400 is not retried");
    fake.clear();

    fake.script("pagerduty", &[(503, ""), (503, ""), (503, ""), (503, "")]);
    let r = pd
        .send(&event(Kind::Transition, "api", "down", false))
        .await;
    assert!(
        matches!(&r, Some(Err(GiveUp::Exhausted { attempts: 4, .. }))),
        "{r:?}"
    );
    assert_eq!(fake.requests("pagerduty").len(), 4, "bounded attempts");
    // The routing key never shows in what is logged or returned.
    assert!(!format!("{r:?}").contains(ROUTING_KEY));
    assert!(!format!("{pd:?}").contains(ROUTING_KEY));
    assert!(!format!("{:?}", pd_config(&url, "")).contains(ROUTING_KEY));
    assert!(!format!("{:?}", pd_config(&url, "")).contains(PD_TOKEN));
}

#[tokio::test]
async fn opsgenie_retries_429_and_does_not_retry_422() {
    let (url, fake) = fake().await;
    let og = Opsgenie::new(&og_config(&url)).unwrap_or_else(|e| panic!("{e}"));
    fake.script("opsgenie", &[(429, OG_THROTTLED), (500, "")]);
    let r = og
        .send(&event(Kind::Transition, "api", "degraded", false))
        .await;
    assert_eq!(
        r,
        Some(Ok(
            "Request will be processed requestId=43a29c5c-3dbf-4fa4-9c26-f4f71023e120".into()
        ))
    );
    assert_eq!(fake.requests("opsgenie").len(), 3);
    fake.clear();
    fake.script("opsgenie", &[(422, OG_UNPROCESSABLE)]);
    let r = og
        .send(&event(Kind::Transition, "api", "down", false))
        .await;
    assert_eq!(
        r,
        Some(Err(GiveUp::Refused {
            what: "opsgenie create api".into(),
            why: "422 Unprocessable Entity: Request body is not processable. Please check the errors.".into(),
        }))
    );
    assert_eq!(fake.requests("opsgenie").len(), 1);
    assert!(!format!("{og:?}").contains(GENIE_KEY));
}

#[tokio::test]
async fn statuspage_names_the_component_on_401_and_404_and_retries_429() {
    let (url, fake) = fake().await;
    let sp = Statuspage::new(&sp_config(&url)).unwrap_or_else(|e| panic!("{e}"));
    let down = event(Kind::Transition, "api", "down", false);
    fake.script(
        "statuspage",
        &[(401, r#"{"error":"Could not authenticate"}"#)],
    );
    let r = sp.send(&down).await;
    assert_eq!(
        r,
        Some(Err(GiveUp::Refused {
            what: "statuspage component cmp1abc (service api) to major_outage".into(),
            why: "401 Unauthorized for component cmp1abc on page pg1abc: Could not authenticate (check [statuspage] api_key)".into(),
        }))
    );
    fake.script(
        "statuspage",
        &[(
            404,
            r#"{"error":"The requested resource could not be found."}"#,
        )],
    );
    let r = sp.send(&down).await;
    assert!(
        matches!(&r, Some(Err(GiveUp::Refused { why, .. })) if why.starts_with("404 Not Found for component cmp1abc on page pg1abc") && why.ends_with("(check [statuspage] page_id and the component id)")),
        "{r:?}"
    );
    assert_eq!(fake.requests("statuspage").len(), 2, "neither is retried");
    fake.clear();
    fake.script(
        "statuspage",
        &[(429, r#"{"error":"rate limited"}"#), (420, "")],
    );
    let r = sp.send(&down).await;
    assert_eq!(r, Some(Ok("component updated".into())));
    assert_eq!(fake.requests("statuspage").len(), 3);
    assert!(!format!("{r:?}{sp:?}").contains(SP_KEY));
    // Unknown leaves the component as it is.
    assert_eq!(
        sp.send(&event(Kind::Transition, "api", "unknown", false))
            .await,
        None
    );
}

/// PagerDuty's documented `GET /oncalls` example, with `include[]=users`.
const ONCALLS: &str = r#"{
  "oncalls": [
    {
      "escalation_policy": {"id": "PT20YPA", "type": "escalation_policy_reference", "summary": "Engineering Escalation Policy", "self": "https://api.pagerduty.com/escalation_policies/PT20YPA", "html_url": "https://subdomain.pagerduty.com/escalation_policies/PT20YPA"},
      "escalation_level": 2,
      "schedule": {"id": "PI7DH85", "type": "schedule_reference", "summary": "Daily Engineering Rotation", "self": "https://api.pagerduty.com/schedules/PI7DH85", "html_url": "https://subdomain.pagerduty.com/schedules/PI7DH85"},
      "user": {"id": "PXPGF42", "type": "user", "name": "Earline Greenholt", "email": "125.greenholt.earline@graham.name", "summary": "Earline Greenholt", "self": "https://api.pagerduty.com/users/PXPGF42", "html_url": "https://subdomain.pagerduty.com/users/PXPGF42"},
      "start": "2015-03-06T15:28:51-05:00",
      "end": "2015-03-07T15:28:51-05:00"
    },
    {
      "escalation_policy": {"id": "PT20YPA", "type": "escalation_policy_reference", "summary": "Engineering Escalation Policy"},
      "escalation_level": 1,
      "schedule": null,
      "user": {"id": "PAM4FGS", "type": "user", "name": "Kyler Kuhn", "email": "kyler@example.com", "summary": "Kyler Kuhn"},
      "start": null,
      "end": null
    }
  ],
  "limit": 25,
  "offset": 0,
  "more": false,
  "total": null
}"#;

#[tokio::test]
async fn oncall_shows_who_is_on_call_and_a_refused_token_clearly() {
    let (url, fake) = fake().await;
    let w = world();
    let cfg = pd_config(
        &url,
        "[schedules]\nprimary = \"PI7DH85\"\nsecondary = \"PXYZ999\"\n",
    );
    w.router
        .register_commands(std::sync::Arc::new(
            Oncall::from_config(&cfg)
                .unwrap_or_else(|e| panic!("{e}"))
                .expect("api token"),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let sent = ask(&w, "console:bob", "!oncall primary").await;
    assert_eq!(sent.len(), 1);
    let text = sent[0].text();
    assert!(
        text.starts_with("on call (primary): 2 entries — asked by console:bob"),
        "{text}"
    );
    assert!(
        text.contains("POLICY / SCHEDULE") && text.contains("LEVEL"),
        "{text}"
    );
    assert!(
        text.contains("Kyler Kuhn <kyler@example.com>") && text.contains("      1  "),
        "{text}"
    );
    assert!(
        text.contains("Engineering Escalation Policy / Daily Engineering Rotation")
            && text.contains("Earline Greenholt <125.greenholt.earline@graham.name>")
            && text.contains("2015-03-07T15:28:51-05:00"),
        "{text}"
    );
    // Level 1 before level 2.
    assert!(
        text.find("Kyler").unwrap_or(0) < text.find("Earline").unwrap_or(0),
        "{text}"
    );
    let req = &fake.requests("oncall")[0];
    assert_eq!(req.method, Method::GET);
    assert_eq!(req.auth, format!("Token token={PD_TOKEN}"));
    assert_eq!(req.accept, "application/vnd.pagerduty+json;version=2");
    assert_eq!(
        req.query,
        "earliest=true&include%5B%5D=users&schedule_ids%5B%5D=PI7DH85"
    );

    // No schedule named: every configured one.
    ask(&w, "console:alice", "!oncall").await;
    assert_eq!(
        fake.requests("oncall")[1].query,
        "earliest=true&include%5B%5D=users&schedule_ids%5B%5D=PI7DH85&schedule_ids%5B%5D=PXYZ999"
    );
    let sent = ask(&w, "console:alice", "!oncall tertiary").await;
    assert_eq!(
        sent[0].text(),
        "oncall: unknown schedule \"tertiary\"; configured: primary, secondary — asked by console:alice"
    );

    // A user without a role here is not told.
    let sent = ask(&w, "console:mallory", "!oncall").await;
    assert_eq!(
        sent[0].text(),
        "you have no roles in this channel — asked by console:mallory"
    );
    assert_eq!(fake.requests("oncall").len(), 2);

    fake.script(
        "oncall",
        &[(
            401,
            r#"{"error":{"message":"Authentication required","code":2006}}"#,
        )],
    );
    let sent = ask(&w, "console:bob", "!oncall primary").await;
    let text = sent[0].text();
    assert_eq!(
        text,
        "oncall: PagerDuty refused the API token (401): check [pagerduty] api_token — asked by console:bob"
    );
    assert!(!text.contains(PD_TOKEN));
}

#[tokio::test]
async fn oncall_without_an_api_token_says_what_to_configure() {
    let w = world();
    w.router
        .register_commands(std::sync::Arc::new(
            fleetcmd_gateway::oncall::not_configured(),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let sent = ask(&w, "console:bob", "!oncall").await;
    assert_eq!(
        sent[0].text(),
        "oncall needs [pagerduty] api_token in gateway.toml — asked by console:bob"
    );
}
